"""`lorafleet bench vs-trl`'s settings load as the run config they claim (the bench itself
needs TRL and is not run in CI)."""

from __future__ import annotations

import pytest

from lorafleet.cluster.bench.vs_trl import (
    KL_COEF,
    SCALES,
    lorafleet_overrides,
    steady_rate,
)
from lorafleet.cluster.cli import parse
from lorafleet.cluster.config import load_train_config


@pytest.mark.parametrize("name", sorted(SCALES))
def test_each_scale_is_a_one_step_grpo_run(name, tmp_path):
    scale = SCALES[name]
    cfg = load_train_config(None, lorafleet_overrides(scale, 3, "bf16", tmp_path / "run"))
    algo = cfg.algo
    batch = scale.prompts * scale.samples
    assert (algo.name, algo.epochs, algo.minibatch_size) == ("grpo", 1, batch)
    assert (algo.kl_mode, algo.kl_coef, cfg.learner.autocast) == ("loss", KL_COEF, "bf16")
    # the one-step update takes its old log-probs from its own pass (what TRL does)
    assert not algo.needs_old_logp_first and algo.uses_reference
    assert cfg.rollout.max_new_tokens == scale.max_new_tokens and cfg.seed == 3
    assert (cfg.prompts_per_iteration, cfg.rollout.samples_per_prompt) == (
        scale.prompts, scale.samples)
    # --autocast off reaches the run as "off" (YAML once read it as False, a config error)
    off = load_train_config(None, lorafleet_overrides(scale, 3, "off", tmp_path / "run"))
    assert off.learner.autocast == "off"


def test_steady_rate_leaves_out_the_warm_up_steps():
    side = {"samples": [256] * 4, "step_seconds": [10.0, 2.0, 2.0, 9.0]}
    assert steady_rate(side, warmup=1) == 128.0  # the median step


def test_cli_takes_the_bench():
    args = parse(["bench", "vs-trl", "--scales", "small", "--seeds", "0,1"])
    assert (args.what, args.scales, args.seeds, args.autocast) == ("vs-trl", "small", "0,1", "auto")
    assert not args.warm and parse(["bench", "vs-trl", "--warm"]).warm
