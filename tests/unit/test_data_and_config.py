"""Config loading of the shipped configs, the prompt stream's exactly-once indexing, sharding."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import QWEN2_ADDITION, train_config_error
from lorafleet.cluster.config import TrainConfig, load_train_config
from lorafleet.cluster.fleet import check_exactly_once, shard
from lorafleet.cluster.tinker.config import ServeConfig, load_serve_config
from lorafleet.common.config import TINY
from lorafleet.common.configio import ConfigError, save_config
from lorafleet.common.data import PromptStream, encode_prompts
from lorafleet.common.records import Prompt, Rollout
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.common.tasks.base import TaskExample
from lorafleet.common.tasks.registry import build_task
from lorafleet.common.tiny_model import SHIPPED_MODELS, build_tiny_model, model_name
from lorafleet.learner.algorithms.registry import GRPOConfig, RLOOConfig, SPRConfig

CONFIGS = Path(__file__).parents[2] / "deploy" / "configs"


def load_shipped(path: Path, overrides: list[str] = ()):
    """A run config, or a server's (serve*.yaml, `lorafleet serve`)."""
    if path.name.startswith("serve"):
        return load_serve_config(path, overrides)
    return load_train_config(path, overrides)


def run_config(path: Path) -> TrainConfig:
    """The run config behind a shipped config (a server's: its fleet's)."""
    cfg = load_shipped(path)
    return cfg.train_config() if isinstance(cfg, ServeConfig) else cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(run_config(path), TrainConfig)


def test_shipped_configs_start_from_shipped_models():
    """Every shipped config on the embedded model loads committed weights (same bytes on every
    CPU) and no shipped model is unused; a recipe change must re-ship (`lorafleet build-model
    CONFIG --ship`); the tests' Qwen2 one is used by tests/ray/test_hot_swap.py."""
    used = {model_name(AdditionTask(), QWEN2_ADDITION)}
    for path in CONFIGS.glob("*.yaml"):
        cfg = run_config(path)
        if cfg.model.name_or_path == TINY:
            recipe = build_task(cfg.task).model_recipe
            name = model_name(recipe, cfg.model.tiny)
            assert (SHIPPED_MODELS / name / "model.safetensors").is_file(), (path.name, name)
            assert build_tiny_model(recipe, cfg.model.tiny) == SHIPPED_MODELS / name
            used.add(name)
    assert {p.name for p in SHIPPED_MODELS.iterdir()} == used


def test_default_yaml_is_the_dataclass_default():
    assert load_train_config(CONFIGS / "default.yaml") == TrainConfig()


def test_overrides_and_errors_name_the_key():
    cfg = load_train_config(None, ["rollout.num_workers=1", "algo.kl_coef=0.1"])
    assert (cfg.rollout.num_workers, cfg.algo.kl_coef) == (1, 0.1)
    with pytest.raises(ConfigError, match="rollout.num_wrkers"):
        load_train_config(None, ["rollout.num_wrkers=1"])
    with pytest.raises(ConfigError, match="algo.kl_mode.*'reward', 'loss'"):
        load_train_config(None, ["algo.kl_mode=both"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_train_config(None, ["lora.rank=12"])


def test_stage_chain_config_and_its_errors():
    cfg = load_train_config(None, ["stages=[sft, dpo, rl]", "sft.data.path=my.jsonl"])
    assert cfg.stages == ["sft", "dpo", "rl"] and cfg.sft.data.path == "my.jsonl"
    with pytest.raises(ConfigError, match="stages.*'rm', 'sft', 'dpo', 'meet', 'rl'"):
        load_train_config(None, ["stages=[sft, ppo]"])
    with pytest.raises(ConfigError, match="stages is empty"):
        load_train_config(None, ["stages=[]"])
    with pytest.raises(ConfigError, match="normalizer=learned"):
        load_train_config(None, ["algo.name=spr", "rollout.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_train_config(None, ["dpo.beta=0"])


def test_algo_section_is_the_named_algorithms_config():
    cfg = load_train_config(CONFIGS / "grpo.yaml")
    assert type(cfg.algo) is GRPOConfig and (cfg.algo.kl_mode, cfg.algo.kl_coef) == ("loss", 0.04)
    assert type(load_train_config(None, ["algo.name=spr"]).algo) is SPRConfig
    # a key the chosen algorithm does not read names the algorithms that do
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'algo.value_lr'; allowed keys in "
                       r"algo: .* \(this is algo.name=grpo; 'value_lr' is read by "
                       r"algo.name=ppo, spr\)"):
        load_train_config(CONFIGS / "grpo.yaml", ["algo.value_lr=0.01"])
    # an override switches the algorithm through the same path
    with pytest.raises(ConfigError, match="'kl_coef' is read by algo.name=ppo, grpo, rloo"):
        load_train_config(CONFIGS / "grpo.yaml", ["algo.name=spr"])
    assert type(load_train_config(CONFIGS / "default.yaml", ["algo.name=rloo"]).algo) is RLOOConfig
    with pytest.raises(ConfigError, match="algo.name: expected one of 'ppo', 'grpo', 'rloo', "
                       "'spr', 'best_of_n', got 'dpo'"):
        load_train_config(None, ["algo.name=dpo"])
    with pytest.raises(ConfigError, match="algo.weight_temperature must be > 0"):
        load_train_config(CONFIGS / "spr.yaml", ["algo.weight_temperature=0"])
    with pytest.raises(ConfigError, match="rloo needs rollout.samples_per_prompt >= 2"):
        load_train_config(CONFIGS / "rloo.yaml", ["rollout.samples_per_prompt=1"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_saved_config_loads_back_the_same(path, tmp_path):
    cfg = load_shipped(path)
    save_config(cfg, tmp_path / path.name)
    assert load_shipped(tmp_path / path.name) == cfg


def test_reward_model_config_errors():
    cfg = load_train_config(None, ["stages=[rm, sft, rl]", "reward.rule_weight=0"])
    assert cfg.uses_reward_model and cfg.rm.data.path == "task"
    with pytest.raises(ConfigError, match="rm must be the first stage"):
        load_train_config(None, ["stages=[sft, rm, rl]"])
    with pytest.raises(ConfigError, match="reward.model is set and an rm stage trains one"):
        load_train_config(None, ["stages=[rm, rl]", "reward.model=runs/rm/reward_model"])
    with pytest.raises(ConfigError, match="rule_weight is 0 and there is no reward model"):
        load_train_config(None, ["reward.rule_weight=0"])
    with pytest.raises(ConfigError, match="model_on_learner is set but there is no reward"):
        load_train_config(None, ["reward.model_on_learner=true"])
    with pytest.raises(ConfigError, match="reward.clip must be > 0"):
        load_train_config(None, ["reward.clip=0"])
    with pytest.raises(ConfigError, match=r"rm.eval_fraction must be in \(0, 1\)"):
        load_train_config(None, ["rm.eval_fraction=1.5"])


@pytest.mark.parametrize("override, message", [
    ("model.name_or_path=/nonexistent/model", "model.name_or_path='/nonexistent/model': the "
     "local model directory /nonexistent/model does not exist; give a Hugging Face model"),
    ("model.name_or_path=nosuch-org/nosuch-model", "model.name_or_path='nosuch-org/nosuch-model'"
     ": neither a local directory nor a model on the hub: not in the local hub cache and "
     "HF_HUB_OFFLINE is set"),
    ("reward.fns=[nosuch.module:fn]", "reward.fns='nosuch.module:fn': cannot import "
     "'nosuch.module' (No module named 'nosuch'); use one of exact_match, label_match, "
     "vader_compound, math_verify, boxed_format, length_penalty, format_regex or "
     "package.module:function"),
    ("reward.fns=[format_regex]", "reward.fns='format_regex' needs reward.format_regex (its "
     "pattern)"),
    ("reward.fns=[nosuch]", "reward.fns='nosuch': unknown reward function; use one of "
     "exact_match"),
    ("reward.fns=[os:nosuch]", "reward.fns='os:nosuch': module 'os' has no 'nosuch'"),
])
def test_bad_model_or_reward_fn_is_one_line_before_ray(
    override, message, tmp_path, capsys, monkeypatch
):
    assert train_config_error([override], tmp_path, capsys, monkeypatch).startswith(
        f"lorafleet: config error: {message}")


def test_overrides_may_follow_options(capsys):
    from lorafleet.cluster.cli import parse

    args = parse(["bench", "demo", "--seeds", "0", "learner.threads=1", "iterations=4"])
    assert (args.seeds, args.items) == ("0", ["learner.threads=1", "iterations=4"])
    assert parse(["nlu-table", "c.yaml", "--shots", "2", "run_dir=x"]).items == ["c.yaml",
                                                                                 "run_dir=x"]
    with pytest.raises(SystemExit):
        parse(["bench", "demo", "--seeds", "0", "c.yaml"])  # the config goes first
    assert "unrecognized arguments: c.yaml" in capsys.readouterr().err


def test_addition_task_splits_are_disjoint_and_correct():
    task = AdditionTask(max_operand=9)
    train, held_out = task.examples("train"), task.examples("eval")
    assert len(train) + len(held_out) == 100 and len(held_out) == 10
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert TaskExample("3+4=", "7") in train + held_out
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.examples("test")


def prompts(n: int) -> list[Prompt]:
    return [Prompt(i, f"p{i}", [1, i], {"reference": str(i)}) for i in range(n)]


def test_prompt_stream_covers_each_epoch_once_with_running_indices():
    stream = PromptStream(prompts(10), seed=3)
    first = stream.next_batch(4) + stream.next_batch(6)
    second = stream.next_batch(10)
    assert [p.index for p in first + second] == list(range(20))
    assert sorted(p.text for p in first) == sorted(f"p{i}" for i in range(10))
    assert sorted(p.text for p in second) == sorted(f"p{i}" for i in range(10))
    assert [p.text for p in first] != [p.text for p in second]  # reshuffled per epoch
    again = PromptStream(prompts(10), seed=3)
    assert [p.text for p in again.next_batch(20)] == [p.text for p in first + second]


def test_too_long_prompt_is_named(tokenizer):
    examples = [TaskExample("1+1=", "2"), TaskExample("1" * 40 + "+1=", "x")]
    with pytest.raises(ValueError, match=r"prompt 1 .* tokens; the limit is 10.*=skip"):
        encode_prompts(examples, tokenizer, max_prompt_tokens=10)
    skipped: list[str] = []  # rollout.too_long_prompts=skip: left out and counted
    kept = encode_prompts(examples, tokenizer, max_prompt_tokens=10, skipped=skipped)
    assert [p.text for p in kept] == ["1+1="] and skipped == ["1" * 40 + "+1="]
    # a user's row is named by its file and row, not its place after the held-out split
    row = TaskExample("2" * 40 + "+1=", "", where="data/prompts.jsonl: row 60")
    with pytest.raises(ValueError, match=r"data/prompts.jsonl: row 60 .* tokens; the limit"):
        encode_prompts([row], tokenizer, max_prompt_tokens=10)


def test_shard_is_a_partition():
    items = list(range(11))
    parts = shard(items, 3)
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sum(parts, []) == items


def test_exactly_once_accounting_flags_lost_and_doubled_prompts():
    batch = prompts(3)

    def rollout(p: Prompt, k: int) -> Rollout:
        return Rollout(p, k, [5], "5", [-0.1], "stop", 0, 0)

    ok = [rollout(p, k) for p in batch for k in range(2)]
    check_exactly_once(batch, ok, n=2)
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        check_exactly_once(batch, [r for r in ok if r.prompt.index != 1], n=2)
    with pytest.raises(RuntimeError, match=r"\[2\]"):
        check_exactly_once(batch, ok + [rollout(batch[2], 2)], n=2)
