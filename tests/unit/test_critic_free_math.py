"""GRPO/RLOO advantages, SPR weights and their limits, best-of-N, weighted NLL, DPO — against
hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lorafleet.learner.algorithms.critic_free import (
    awr_weights,
    best_of_n_weights,
    dpo_loss,
    grpo_advantages,
    rloo_advantages,
    sequence_advantage_loss,
    spr_weights,
    weighted_nll,
)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0]])


def test_grpo_advantages():
    # prompt 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.86603
    # prompt 1: mean 0.5, std sqrt((3 * 0.25 + 2.25) / 3) = 1 -> [-0.5, -0.5, -0.5, 1.5]
    expected = torch.tensor([[0.86603, -0.86603, -0.86603, 0.86603], [-0.5, -0.5, -0.5, 1.5]])
    assert_close(grpo_advantages(REWARDS, eps=0.0), expected, atol=1e-4, rtol=0)
    assert_close(grpo_advantages(REWARDS, scale_by_std=False),
                 torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.5, -0.5, -0.5, 1.5]]))
    # A group with one reward for all has no signal (0, not NaN).
    assert_close(grpo_advantages(torch.ones(1, 3)), torch.zeros(1, 3))


def test_rloo_advantages():
    # prompt 0: r_0 - mean(0, 0, 1) = 1 - 1/3; r_1 - mean(1, 0, 1) = -2/3
    # prompt 1: r_3 - mean(0, 0, 0) = 2; r_0 - mean(0, 0, 2) = -2/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-2 / 3, -2 / 3, -2 / 3, 2.0]])
    assert_close(rloo_advantages(REWARDS), expected)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.ones(3, 1))


def test_spr_weights_and_limits():
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    # beta = 1: 3 * e^r / (1 + e + e^2) = 3 * [1, 2.71828, 7.38906] / 11.10734
    expected = 3 * torch.tensor([1.0, math.e, math.e**2]) / (1 + math.e + math.e**2)
    assert_close(spr_weights(rewards, beta=1.0), expected[None])  # [0.2701, 0.7342, 1.9957]
    assert_close(spr_weights(rewards, beta=1.0, max_weight=1.5),
                 torch.tensor([[0.27010, 0.73421, 1.5]]), atol=1e-4, rtol=0)
    # beta -> 0: all weight on the best sample = best-of-N SFT.
    assert_close(spr_weights(rewards, beta=1e-3), torch.tensor([[0.0, 0.0, 3.0]]))
    assert_close(best_of_n_weights(rewards), torch.tensor([[0.0, 0.0, 3.0]]))
    # beta -> inf: uniform weights 1 = plain SFT on the samples.
    assert_close(spr_weights(rewards, beta=1e6), torch.ones(1, 3), atol=1e-5, rtol=0)
    # weights average to 1 per prompt before clipping (V(x) normalises them).
    assert_close(spr_weights(REWARDS, beta=0.3).mean(-1), torch.ones(2))


def test_best_of_n_breaks_ties_on_the_first():
    assert_close(best_of_n_weights(REWARDS), torch.tensor([[4.0, 0, 0, 0], [0, 0, 0, 4.0]]))


def test_weighted_nll():
    logp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]])  # 9.0 = padding, masked
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    weights = torch.tensor([2.0, 1.0])
    # sums: -3, -0.5 -> -(2 * -3 + 1 * -0.5) / 2 = 3.25
    assert_close(weighted_nll(logp, mask, weights, length_normalize=False), torch.tensor(3.25))
    # per-token means: -1.5, -0.5 -> -(2 * -1.5 + -0.5) / 2 = 1.75
    assert_close(weighted_nll(logp, mask, weights, length_normalize=True), torch.tensor(1.75))
    # SPR with beta -> inf is plain SFT: uniform weights give the mean NLL.
    uniform = spr_weights(torch.tensor([[0.0, 1.0]]), beta=1e9).reshape(-1)
    assert_close(weighted_nll(logp, mask, uniform, False), torch.tensor(1.75), atol=1e-6, rtol=0)


def test_dpo_loss():
    # margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 0.5 * (1 + 1) = 1 -> -log sigmoid(1) = 0.31326
    loss, margin = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                            torch.tensor([-2.0]), beta=0.5)
    assert_close(loss, torch.tensor(0.31326), atol=1e-5, rtol=0)
    assert_close(margin, torch.tensor([1.0]))
    # equal policy and reference: margin 0 -> log 2
    loss, margin = dpo_loss(*(torch.tensor([-1.0]),) * 4, beta=0.1)
    assert_close(loss, torch.tensor(math.log(2)))
    assert margin.item() == 0.0


def test_awr_weights_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.5, 1.0])
    # exp((1 - .5) / .5) = e, exp(-.5 / .5) = 1/e, exp(0) = 1
    assert_close(awr_weights(rewards, values, beta=0.5), torch.tensor([math.e, 1 / math.e, 1.0]))
    # clipping caps only the large weight; a learned V equal to r gives weight 1 (plain SFT)
    assert_close(awr_weights(rewards, values, 0.5, max_weight=2.0),
                 torch.tensor([2.0, 1 / math.e, 1.0]))
    assert_close(awr_weights(rewards, rewards, 0.1), torch.ones(3))


def test_sequence_advantage_loss_broadcasts_over_tokens():
    logp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clip_fraction, _ = sequence_advantage_loss(
        logp, torch.zeros(2, 2), torch.tensor([1.0, -2.0]), mask, clip_eps=0.2
    )
    # ratio 1 everywhere: loss = mean over 3 tokens of -A = -(1 + 1 - 2) / 3 = 0
    assert_close(loss, torch.tensor(0.0))
    loss.backward()
    # d loss / d logp = -A * ratio / 3 on real tokens
    assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert clip_fraction.item() == 0.0


def test_group_rewards_needs_prompt_major_batches():
    from lorafleet.common.records import Prompt, Rollout, ScoredRollout
    from lorafleet.learner.rl import group_rewards

    def scored(prompt: int, k: int, reward: float) -> ScoredRollout:
        p = Prompt(prompt, "", [1], {})
        return ScoredRollout(Rollout(p, k, [5], "", [0.0], "stop", 0, 0), reward)

    batch = [scored(0, 0, 1.0), scored(0, 1, 0.0), scored(1, 0, 0.5), scored(1, 1, 0.25)]
    assert_close(group_rewards(batch), torch.tensor([[1.0, 0.0], [0.5, 0.25]]))
    with pytest.raises(ValueError, match="not the 2 samples of one prompt"):
        group_rewards([batch[0], batch[1], batch[3], batch[2]])
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        group_rewards(batch[:3])
