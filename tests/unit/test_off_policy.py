"""rollout.mode=async on the learner side: decoupled PPO's behaviour weights against
hand-computed numbers, the staleness bound, and the config keys of the two modes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from helpers import contrast_batch, new_learner
from lorafleet.cluster.config import load_train_config
from lorafleet.common.configio import ConfigError
from lorafleet.learner.algorithms.critic_free import sequence_advantage_loss
from lorafleet.learner.algorithms.off_policy import behaviour_weights, weighted_token_mean
from lorafleet.learner.algorithms.ppo import kl_penalty, masked_mean, ppo_policy_loss
from lorafleet.learner.algorithms.registry import GRPOConfig
from lorafleet.learner.core import SyncError
from lorafleet.learner.rl import run_passes


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_behaviour_weights_are_truncated_ratios_zero_on_padding() -> None:
    prox = t([math.log(0.5), math.log(0.9), math.log(0.3)])
    behaviour = t([math.log(0.25), math.log(0.1), math.log(0.6)])
    mask = t([1.0, 1.0, 0.0])
    # 0.5 / 0.25 = 2; 0.9 / 0.1 = 9 -> cap 5; padding -> 0
    assert_close(behaviour_weights(prox, behaviour, mask, cap=5.0), t([2.0, 5.0, 0.0]))


def test_k3_kl_on_another_policys_samples_is_weighted_back() -> None:
    # token 1: the learner finds it unlikely (pi 1e-6) where mu and the reference do not
    # (0.5): k3 = 0.5 / 1e-6 - log(5e5) - 1 = 499985.9; weight pi / mu = 2e-6 -> 1.0;
    # token 2 on-policy (pi = mu = 0.4, ref 0.2): k3 = 0.5 - log 0.5 - 1 = 0.19315, weight 1
    logp = t([math.log(1e-6), math.log(0.4), 0.0])
    ref = t([math.log(0.5), math.log(0.2), 0.0])
    mu = t([math.log(0.5), math.log(0.4), 0.0])
    mask = t([1.0, 1.0, 0.0])
    kl = kl_penalty(logp, ref, "k3")
    assert_close(masked_mean(kl, mask), torch.tensor((499985.9 + 0.19315) / 2), rtol=1e-4,
                 atol=0)
    weights = behaviour_weights(logp, mu, mask, cap=5.0)
    assert_close(weighted_token_mean(kl, weights, mask), torch.tensor((1.0 + 0.19315) / 2),
                 rtol=1e-4, atol=0)
    # on-policy (weights = mask) it is the plain mean, to the bit
    assert torch.equal(weighted_token_mean(kl, mask, mask), masked_mean(kl, mask))


def test_decoupled_loss_weights_each_token_of_the_clipped_objective() -> None:
    # one sample, 2 tokens, advantage 1: r = pi / pi_prox = 1.5 (clipped to 1.2) and 0.5
    logp = t([math.log(0.6), math.log(0.2)])
    prox = t([math.log(0.4), math.log(0.4)])
    weights = t([2.0, 0.5])
    mask = t([1.0, 1.0])
    loss, clip_fraction, _ = sequence_advantage_loss(
        logp, prox, torch.tensor([1.0]), mask, 0.2, weights)
    # -(2 * min(1.5, 1.2) + 0.5 * min(0.5, 0.8)) / 2 = -(2.4 + 0.25) / 2
    assert_close(loss, torch.tensor(-1.325))
    assert_close(clip_fraction, torch.tensor(0.5))
    # the mask as weights is the on-policy objective
    on_policy, _, _ = sequence_advantage_loss(logp, prox, torch.tensor([1.0]), mask, 0.2)
    assert_close(on_policy, ppo_policy_loss(logp, prox, mask, mask, 0.2)[0])
    assert_close(on_policy, torch.tensor(-(1.2 + 0.5) / 2))


def prepared(rl, scored, version):
    """The batch's context with its passes run, as the update sees it."""
    ctx = rl.prepare(scored, version)
    run_passes([(rl, ctx)])
    return ctx


def test_learner_takes_samples_up_to_max_staleness_versions_old(tiny_model_path, tokenizer):
    rl = new_learner(tiny_model_path, tokenizer.pad_token_id, GRPOConfig(), max_staleness=1).rl
    # at version 1, as after one update (the weights do not matter here)
    ctx = prepared(rl, contrast_batch(tokenizer, 0)[:8], 1)  # one version behind: taken
    weights, mask = ctx.behaviour_weights, ctx.batch.mask
    # vLLM's log-probs in contrast_batch are 0 (p = 1): w = pi_old / 1, in (0, 1) on tokens
    assert_close(weights, torch.exp(ctx.old_logp) * mask)
    assert bool((((weights > 0) & (weights < 1)) | (mask == 0)).all())
    with pytest.raises(SyncError, match=r"more than 1 versions behind\): prompt 0 sample 0 "
                       r"came from adapter v-1 on worker 0, learner is at v1"):
        rl.prepare(contrast_batch(tokenizer, -1)[:8], 1)
    rl.max_staleness = 0  # rollout.mode=sync
    with pytest.raises(SyncError, match="more than 0 versions behind"):
        rl.prepare(contrast_batch(tokenizer, 0)[:8], 1)
    ctx = prepared(rl, contrast_batch(tokenizer, 1)[:8], 1)
    assert ctx.behaviour_weights is ctx.batch.mask  # the on-policy objective


def test_async_keys_and_their_errors():
    cfg = load_train_config(None, ["rollout.mode=async"])
    assert (cfg.rollout.staleness_bound, cfg.rollout.max_behaviour_weight) == (1, 5.0)
    assert load_train_config(None).rollout.staleness_bound == 0
    assert load_train_config(None, ["rollout.mode=async", "rollout.max_staleness=3",
                                    "algo.name=grpo"]).rollout.staleness_bound == 3
    for key in ("max_staleness=2", "max_behaviour_weight=2"):
        with pytest.raises(ConfigError, match=f"rollout.{key.split('=')[0]} is read only with "
                           "rollout.mode=async"):
            load_train_config(None, [f"rollout.{key}"])
    with pytest.raises(ConfigError, match="rollout.max_staleness must be >= 1, got 0"):
        load_train_config(None, ["rollout.mode=async", "rollout.max_staleness=0"])
    with pytest.raises(ConfigError, match="rollout.max_behaviour_weight must be > 0"):
        load_train_config(None, ["rollout.mode=async", "rollout.max_behaviour_weight=0"])
    with pytest.raises(ConfigError, match="algo.name=spr has no importance ratio"):
        load_train_config(None, ["rollout.mode=async", "algo.name=spr"])
    assert replace(cfg.rollout, mode="sync", max_staleness=None).staleness_bound == 0
