"""Unit tests for lorafleet.learner.algorithms.ppo against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lorafleet.learner.algorithms.ppo import (
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_ignores_padding() -> None:
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 100.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    # (1 + 2 + 3 + 4 + 5) / 5 = 3; the padded 100 must not count
    assert_close(masked_mean(x, mask), torch.tensor(3.0))
    # row 0: 6 / 3 = 2; row 1: 9 / 2 = 4.5
    assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 4.5]))


def test_masked_whiten_uses_masked_biased_stats() -> None:
    x = t([0.0, 4.0, 4.0], [0.0, 50.0, 50.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 0.0, 0.0])
    # real values 0, 4, 4, 0: mean 2; var = (4 + 4 + 4 + 4) / 4 = 4 (not /3), std 2
    # (x - 2) / 2 -> -1, 1, 1, -1; padding -> 0
    assert_close(masked_whiten(x, mask), t([-1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]))
    # shift_mean=False adds the mean 2 back: -1 + 2 = 1, 1 + 2 = 3
    assert_close(masked_whiten(x, mask, shift_mean=False), t([1.0, 3.0, 3.0], [1.0, 0.0, 0.0]))


# logp - ref_logp = d = [0, -1, 1]; ref_logp - logp = r = [0, 1, -1]
LOGP = t([-1.0, -2.0, -0.5])
REF_LOGP = t([-1.0, -1.0, -1.5])


def test_kl_k1() -> None:
    assert_close(kl_penalty(LOGP, REF_LOGP, "k1"), t([0.0, -1.0, 1.0]))  # d


def test_kl_k2() -> None:
    # 0.5 * d^2 = 0.5 * [0, 1, 1]
    assert_close(kl_penalty(LOGP, REF_LOGP, "k2"), t([0.0, 0.5, 0.5]))


def test_kl_k3() -> None:
    k3 = kl_penalty(LOGP, REF_LOGP, "k3")
    # exp(r) - r - 1: [1 - 0 - 1, e - 1 - 1, e^-1 + 1 - 1] = [0, e - 2, e^-1]
    assert_close(k3, t([0.0, math.e - 2.0, math.exp(-1.0)]))
    assert bool((k3 >= 0).all())
    assert_close(kl_penalty(REF_LOGP, REF_LOGP, "k3"), torch.zeros(1, 3))  # equal -> 0


def test_kl_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match=r"k1.*k2.*k3"):
        kl_penalty(LOGP, REF_LOGP, "k4")


def test_token_rewards_score_at_last_real_token() -> None:
    scores = torch.tensor([1.0, 2.0])
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0 (len 3): -0.5 * [0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15], + 1 at t=2 -> 0.85
    # row 1 (len 2): -0.5 * [0.4, 0.5] = [-0.2, -0.25], + 2 at t=1 -> 1.75; padding 0
    assert_close(rewards, t([-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]))


def test_gae_two_rows_of_different_length() -> None:
    # gamma = 0.9, lam = 0.5 -> gamma * lam = 0.45. Padding holds garbage on purpose.
    rewards = t([1.0, 0.0, 2.0], [0.0, 1.0, 7.0])
    values = t([0.5, 1.0, 1.5], [2.0, 0.5, 9.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 2 + 0.9*0 - 1.5 = 0.5                   A2 = 0.5
    #        d1 = 0 + 0.9*1.5 - 1.0 = 0.35                A1 = 0.35 + 0.45*0.5 = 0.575
    #        d0 = 1 + 0.9*1.0 - 0.5 = 1.4                 A0 = 1.4 + 0.45*0.575 = 1.65875
    # row 1: d1 = 1 + 0.9*0 - 0.5 = 0.5 (V after end = 0, not 9)   A1 = 0.5
    #        d0 = 0 + 0.9*0.5 - 2.0 = -1.55               A0 = -1.55 + 0.45*0.5 = -1.325
    #        A2 = 0 (padding)
    assert_close(adv, t([1.65875, 0.575, 0.5], [-1.325, 0.5, 0.0]))
    # returns = A + V: [2.15875, 1.575, 2.0], [0.675, 1.0, 0 (padding)]
    assert_close(ret, t([2.15875, 1.575, 2.0], [0.675, 1.0, 0.0]))


def test_policy_loss_unclipped_token_mean() -> None:
    ratio = t([1.1, 0.9, 3.0], [1.0, 3.0, 3.0])
    adv = t([1.0, -2.0, 5.0], [0.5, 5.0, 5.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    logp = ratio.log()
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, torch.zeros_like(logp), adv, mask, 0.2)
    # all real ratios in [0.8, 1.2] -> -A * ratio: -1.1, +1.8, -0.5
    # token mean (-1.1 + 1.8 - 0.5) / 3 = 0.2 / 3  (mean of row means would be -0.075)
    assert_close(loss, torch.tensor(0.2 / 3))
    assert_close(clip_frac, torch.tensor(0.0))  # padded ratio 3.0 must not count
    # 0.5 * (log 1.1^2 + log 0.9^2 + log 1^2) / 3
    assert_close(approx_kl, torch.tensor(0.5 * (math.log(1.1) ** 2 + math.log(0.9) ** 2) / 3))


def test_policy_loss_clipped_positive_advantage() -> None:
    ratio = t([1.5, 1.1, 0.5])
    adv = t([2.0, 2.0, 2.0])
    mask = torch.ones(1, 3)
    logp = ratio.log().requires_grad_()
    loss, clip_frac, _ = ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask, 0.2)
    # t0: max(-2*1.5, -2*1.2) = max(-3.0, -2.4) = -2.4   (clipped)
    # t1: -2*1.1 = -2.2                                   (inside the clip range)
    # t2: max(-2*0.5, -2*0.8) = max(-1.0, -1.6) = -1.0   (low ratio, A > 0: not clipped)
    # loss = (-2.4 - 2.2 - 1.0) / 3 = -5.6 / 3
    assert_close(loss, torch.tensor(-5.6 / 3))
    assert_close(clip_frac, torch.tensor(1 / 3))
    # d/dlogp of -A*ratio is -A*ratio; the clipped token gets no gradient:
    # [0, -2.2 / 3, -1.0 / 3]
    loss.backward()
    assert_close(logp.grad, t([0.0, -2.2 / 3, -1.0 / 3]))


def test_policy_loss_clipped_negative_advantage() -> None:
    ratio = t([0.5, 1.5, 0.9])
    adv = t([-1.0, -1.0, -1.0])
    mask = torch.ones(1, 3)
    loss, clip_frac, _ = ppo_policy_loss(ratio.log(), torch.zeros(1, 3), adv, mask, 0.2)
    # t0: max(1*0.5, 1*0.8) = 0.8   (clipped: low ratio, A < 0)
    # t1: max(1*1.5, 1*1.2) = 1.5   (high ratio, A < 0: not clipped)
    # t2: 0.9                       (inside the clip range)
    # loss = (0.8 + 1.5 + 0.9) / 3 = 3.2 / 3
    assert_close(loss, torch.tensor(3.2 / 3))
    assert_close(clip_frac, torch.tensor(1 / 3))


def test_value_loss_unclipped() -> None:
    values = t([1.0, 2.0])
    old_values = t([0.9, 2.1])  # |v - old_v| = 0.1 < 0.2: clipping is a no-op
    returns = t([2.0, 1.0])
    loss, clip_frac = ppo_value_loss(values, old_values, returns, torch.ones(1, 2), 0.2)
    # 0.5 * ((1 - 2)^2 + (2 - 1)^2) / 2 = 0.5
    assert_close(loss, torch.tensor(0.5))
    assert_close(clip_frac, torch.tensor(0.0))


def test_value_loss_clipped() -> None:
    values = t([1.0, 2.0, 2.0, 9.0])
    old_values = t([0.9, 1.0, 1.0, 0.0])
    returns = t([2.0, 1.0, 2.0, 0.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    loss, clip_frac = ppo_value_loss(values, old_values, returns, mask, 0.2)
    # t0: v_clip = 0.9 + 0.1 = 1.0; max((1-2)^2, (1-2)^2) = 1
    # t1: v_clip = 1.0 + 0.2 = 1.2; max((2-1)^2, (1.2-1)^2) = max(1, 0.04) = 1   (unclipped)
    # t2: v_clip = 1.0 + 0.2 = 1.2; max((2-2)^2, (1.2-2)^2) = max(0, 0.64) = 0.64 (clipped)
    # t3: padding. loss = 0.5 * (1 + 1 + 0.64) / 3 = 0.44
    assert_close(loss, torch.tensor(0.44))
    assert_close(clip_frac, torch.tensor(1 / 3))
