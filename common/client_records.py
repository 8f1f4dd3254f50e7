"""Typed records of client-driven training (the Tinker-compatible service, cluster/tinker/):
what the server hands the learner for a client's forward/backward and optimiser step, and what
comes back. The client computes its own rewards and advantages; the learner only applies the
loss it names to the sequences it sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# Tinker's built-in losses the learner computes (learner/client_losses.py); the SDK names
# others (dro, gspo, stable_reinforce, custom) that the server refuses by name.
CLIENT_LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo")


@dataclass(frozen=True)
class TokenDatum:
    """One sequence (Tinker's Datum): the model reads `tokens`; at each position t the loss
    inputs are about predicting the next token: `inputs["target_tokens"][t]` (int64) and the
    loss's float32 inputs (`weights`, the sampler's `logprobs`, `advantages`), each a 1-D
    tensor as long as `tokens`."""

    tokens: list[int]
    inputs: dict[str, Tensor]


@dataclass(frozen=True)
class ClientLoss:
    """A loss by name (one of CLIENT_LOSSES) with its settings, e.g. PPO's clip thresholds."""

    name: str
    config: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Per datum, the log-probs of its target tokens under the client's adapter (1-D, as long
    as the datum); the batch's metrics, each named `<name>:<reduction>` as the SDK combines
    them (e.g. `loss:sum`)."""

    logprobs: list[Tensor]
    metrics: dict[str, float]


@dataclass(frozen=True)
class AdamStep:
    """One optimiser step's AdamW settings (Tinker's AdamParams); grad_clip_norm 0: no
    clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
