"""Reward combination and normalisation, applied on the driver so the statistics cover every
reward actor's scores (a per-actor running mean would differ from actor to actor)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def combine_rewards(
    rule: float | None, model: float | None, rule_weight: float, model_weight: float
) -> float:
    """The weighted sum of the configured parts; a part with weight 0 may be absent (None)."""
    total = 0.0
    for name, value, weight in (("rule", rule, rule_weight), ("model", model, model_weight)):
        if weight == 0:
            continue
        if value is None:
            raise ValueError(f"reward part {name!r} has weight {weight} but was not computed")
        total += weight * value
    return total


@dataclass
class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update, so a
    batch folds in at once); saved in checkpoints so a resumed run normalises the same way."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: list[float]) -> None:
        n = len(values)
        if n == 0:
            return
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state(self) -> dict:
        return asdict(self)


def normalize_rewards(
    values: list[float], moments: RunningMoments | None, clip: float | None, eps: float = 1e-8
) -> list[float]:
    """`(r - mean) / std` with the given running moments (None: unchanged), then clipped to
    [-clip, clip] (None: no clipping)."""
    if moments is not None:
        values = [(v - moments.mean) / (moments.std + eps) for v in values]
    if clip is not None:
        values = [min(max(v, -clip), clip) for v in values]
    return values
