"""Tinker's built-in losses (learner/client_losses.py) against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lorafleet.common.client_records import CLIENT_LOSSES, ClientLoss
from lorafleet.learner.client_losses import LOSSES, check_inputs, loss_config

E = math.exp


def per_token(name: str, logp: list[float], config: dict | None = None, **inputs):
    """The loss's per-token values and d(sum)/d(logp), as lists."""
    logp_t = torch.tensor(logp, requires_grad=True)
    tensors = {key: torch.tensor(values) for key, values in inputs.items()}
    loss = LOSSES[name].per_token(logp_t, tensors, loss_config(ClientLoss(name, config or {})))
    loss.sum().backward()
    return loss.tolist(), logp_t.grad.tolist()


def test_the_registry_holds_every_client_loss():
    assert tuple(LOSSES) == CLIENT_LOSSES


def test_cross_entropy_weights_each_token_and_defaults_to_one():
    loss, grad = per_token("cross_entropy", [-1.0, -2.0, -0.5], weights=[1.0, 0.0, -2.0])
    assert loss == pytest.approx([1.0, 0.0, -1.0]) and grad == pytest.approx([-1.0, 0.0, 2.0])
    loss, grad = per_token("cross_entropy", [-1.0, -2.0, -0.5])
    assert loss == pytest.approx([1.0, 2.0, 0.5]) and grad == pytest.approx([-1.0] * 3)


def test_importance_sampling_weights_the_advantage_by_the_sampler_ratio():
    loss, grad = per_token("importance_sampling", [-1.0, -2.0, -0.5],
                           logprobs=[-1.0, -1.5, -3.0], advantages=[2.0, -1.0, 0.0])
    # ratios 1, e^-0.5, and 1 where the advantage is 0 (the e^2.5 there is masked)
    assert loss == pytest.approx([-2.0, E(-0.5), 0.0])
    assert grad == pytest.approx([-2.0, E(-0.5), 0.0])


def test_ppo_clips_the_ratio_where_it_would_gain_from_it():
    logp, sampler = [0.5, -0.5, 0.5, -0.5], [0.0] * 4
    advantages = [1.0, 1.0, -1.0, -1.0]
    loss, grad = per_token("ppo", logp, logprobs=sampler, advantages=advantages)
    # ratio e^0.5 = 1.65 > 1.2 with A > 0: clipped (no gradient); e^-0.5 = 0.61 with A > 0: the
    # unclipped ratio is the smaller; e^0.5 with A < 0: unclipped; e^-0.5 < 0.8, A < 0: clipped
    assert loss == pytest.approx([-1.2, -E(-0.5), E(0.5), 0.8])
    assert grad == pytest.approx([0.0, -E(-0.5), E(0.5), 0.0])
    loss, _ = per_token("ppo", logp, {"clip_high_threshold": 2.0, "clip_low_threshold": 0.5},
                        logprobs=sampler, advantages=advantages)
    assert loss == pytest.approx([-E(0.5), -E(-0.5), E(0.5), E(-0.5)])


def test_cispo_weights_every_token_by_its_clipped_ratio_as_a_constant():
    loss, grad = per_token("cispo", [-1.0, -2.0], logprobs=[-3.0, -1.5], advantages=[1.0, -2.0])
    # ratio e^2 = 7.39 clipped to 4; e^-0.5 within [0, 4]; the weight carries no gradient
    assert loss == pytest.approx([4.0, -2 * 2 * E(-0.5)])
    assert grad == pytest.approx([-4.0, 2 * E(-0.5)])
    loss, grad = per_token("cispo", [-1.0], {"clip_high_threshold": 10.0}, logprobs=[-3.0],
                           advantages=[1.0])
    assert loss == pytest.approx([E(2.0)]) and grad == pytest.approx([-E(2.0)])


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo"])
def test_a_zero_advantage_contributes_exactly_zero_even_where_the_ratio_overflows(name):
    # exp(0 - (-200)) is inf in float32: masked before the exp, it makes neither inf nor NaN
    loss, grad = per_token(name, [0.0, -1.0], logprobs=[-200.0, -1.0], advantages=[0.0, 1.0])
    assert loss[0] == 0.0 and grad[0] == 0.0
    assert all(math.isfinite(x) for x in loss + grad)


def test_unknown_settings_and_missing_or_unread_inputs_are_named():
    assert loss_config(ClientLoss("ppo", {"clip_low_threshold": 0.5})) == {
        "clip_low_threshold": 0.5, "clip_high_threshold": 1.2}
    with pytest.raises(ValueError, match="loss 'ppo' has no setting 'clip'; its settings: "
                                         "clip_low_threshold, clip_high_threshold"):
        loss_config(ClientLoss("ppo", {"clip": 0.2}))
    with pytest.raises(ValueError, match="'cross_entropy' has no setting 'beta'; its settings: "
                                         "none"):
        loss_config(ClientLoss("cross_entropy", {"beta": 0.1}))
    with pytest.raises(ValueError, match="unknown loss 'dro'; the learner computes "
                                         "cross_entropy, importance_sampling, ppo, cispo"):
        loss_config(ClientLoss("dro"))
    targets = {"target_tokens": torch.tensor([1])}
    with pytest.raises(ValueError, match="datum 3: loss 'importance_sampling' lacks 'logprobs', "
                                         "'advantages'; its inputs: target_tokens, logprobs, "
                                         "advantages"):
        check_inputs(ClientLoss("importance_sampling"), targets, "datum 3")
    with pytest.raises(ValueError, match="datum 0: loss 'cross_entropy' has 'advantages', which "
                                         "it does not read; its inputs: target_tokens, weights"):
        check_inputs(ClientLoss("cross_entropy"), {**targets, "advantages": torch.tensor([1.0])},
                     "datum 0")
