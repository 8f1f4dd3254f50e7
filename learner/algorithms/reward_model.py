"""Reward-model losses (PERL): the Bradley-Terry pairwise loss with optional margins and ties."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, tie: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean `-log sigmoid(r_chosen - r_rejected - margin)` over the pairs; returns (loss, the
    per-pair score differences r_chosen - r_rejected).

    `margin` ([B], >= 0) asks for a gap of at least that size (Llama 2's graded preferences).
    A pair marked `tie` ([B] bool) has no preferred side: its target probability is 1/2,
    i.e. `-(log sigmoid(d) + log sigmoid(-d)) / 2`, minimised at d = 0; margins do not apply.
    """
    diff = chosen - rejected
    shifted = diff - margin if margin is not None else diff
    loss = -F.logsigmoid(shifted)
    if tie is not None:
        tie_loss = -(F.logsigmoid(diff) + F.logsigmoid(-diff)) / 2
        loss = torch.where(tie, tie_loss, loss)
    return loss.mean(), diff


def pairwise_accuracy(diff: Tensor, tie: Tensor | None = None) -> Tensor:
    """Share of (non-tie) pairs the model ranks the right way round (ties count as wrong)."""
    correct = (diff > 0).float()
    if tie is None:
        return correct.mean()
    decided = ~tie
    return correct[decided].mean() if decided.any() else torch.tensor(float("nan"))
