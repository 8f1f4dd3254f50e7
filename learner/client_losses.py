"""Tinker's built-in losses (common/client_records.py CLIENT_LOSSES), as small pure torch
functions of one datum: `logp` [N] the log-probs of its target tokens under the client's
adapter, `inputs` its loss inputs (each [N]), `config` the loss's settings with their
defaults filled in. Each returns the per-token loss [N]; the caller sums it over positions and
datums (Tinker's losses are sums, the client scales its advantages or weights to taste).

The RL losses read the sampler's log-probs as `logprobs` and mask positions whose advantage
is 0 before the exp, so a position the client leaves out contributes exactly 0 (and no NaN
gradient) however far the policy has moved from the sampler there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common.client_records import CLIENT_LOSSES, ClientLoss

TARGETS = "target_tokens"  # every loss's: the tokens whose log-probs `logp` holds


def cross_entropy(logp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """-weights * logp; weights may be negative (forward_backward_custom sends -dC/dlogp)."""
    weights = inputs.get("weights")
    return -logp if weights is None else -weights * logp


def sampler_ratio(logp: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """pi(token) / sampler(token), 1 where the advantage is 0 (masked before the exp)."""
    used = inputs["advantages"] != 0
    return torch.exp(torch.where(used, logp - inputs["logprobs"], torch.zeros_like(logp)))


def importance_sampling(logp: Tensor, inputs: dict[str, Tensor],
                        config: dict[str, float]) -> Tensor:
    """-(ratio * A): REINFORCE corrected for the sampler being another policy."""
    return -(sampler_ratio(logp, inputs) * inputs["advantages"])


def ppo(logp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """PPO's clipped surrogate: -min(ratio * A, clip(ratio, low, high) * A)."""
    ratio, advantages = sampler_ratio(logp, inputs), inputs["advantages"]
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """CISPO (MiniMax-M1): the clipped ratio as a constant weight on -logp * A, so every token
    keeps a gradient."""
    weight = sampler_ratio(logp, inputs).clamp(
        config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -(weight * logp * inputs["advantages"])


@dataclass(frozen=True)
class LossSpec:
    """A loss's function, the inputs it needs (`optional`: it reads them if sent) and its
    settings with their defaults."""

    per_token: Callable[[Tensor, dict[str, Tensor], dict[str, float]], Tensor]
    inputs: tuple[str, ...]
    config: dict[str, float]
    optional: tuple[str, ...] = ()


RL_INPUTS = (TARGETS, "logprobs", "advantages")
LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, (TARGETS,), {}, optional=("weights",)),
    "importance_sampling": LossSpec(importance_sampling, RL_INPUTS, {}),
    "ppo": LossSpec(ppo, RL_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(cispo, RL_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
}


def loss_spec(loss: ClientLoss) -> LossSpec:
    if loss.name not in LOSSES:
        raise ValueError(f"unknown loss {loss.name!r}; the learner computes "
                         f"{', '.join(CLIENT_LOSSES)}")
    return LOSSES[loss.name]


def loss_config(loss: ClientLoss) -> dict[str, float]:
    """The loss's settings: its defaults overridden by the client's; an unknown key is a
    ValueError naming the allowed ones."""
    spec = loss_spec(loss)
    unknown = sorted(loss.config.keys() - spec.config.keys())
    if unknown:
        allowed = ", ".join(spec.config) or "none"
        raise ValueError(f"loss {loss.name!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {allowed}")
    return {**spec.config, **{key: float(value) for key, value in loss.config.items()}}


def check_inputs(loss: ClientLoss, inputs: dict[str, Tensor], where: str) -> None:
    """A ValueError naming the input `inputs` (of the datum `where`) lacks, or one the loss
    does not read."""
    spec = loss_spec(loss)
    missing = [key for key in spec.inputs if key not in inputs]
    unknown = sorted(inputs.keys() - {*spec.inputs, *spec.optional})
    if missing or unknown:
        problem = (f"lacks {', '.join(map(repr, missing))}" if missing
                   else f"has {', '.join(map(repr, unknown))}, which it does not read")
        raise ValueError(f"{where}: loss {loss.name!r} {problem}; its inputs: "
                         f"{', '.join([*spec.inputs, *spec.optional])}")
