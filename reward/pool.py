"""The reward pool: several reward actors, fed in batches, load-balanced by Ray's ActorPool."""

from __future__ import annotations

import math

from ..common.records import Rollout, ScoredRollout
from .rules import get_reward_fn


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value; names the sample."""


class RewardWorker:
    """Scores batches of rollouts with one reward function (run as a Ray actor)."""

    def __init__(self, fn_name: str) -> None:
        self.fn_name = fn_name
        self.fn = get_reward_fn(fn_name)

    def score(self, rollouts: list[Rollout]) -> list[ScoredRollout]:
        scored = []
        for r in rollouts:
            try:
                value = float(self.fn(r.response_text, r.prompt.reference))
            except Exception as exc:
                raise RewardError(
                    f"reward {self.fn_name!r} raised on {r.sample_id} (prompt {r.prompt.text!r},"
                    f" response {r.response_text!r}): {exc!r}"
                ) from exc
            if not math.isfinite(value):
                raise RewardError(
                    f"reward {self.fn_name!r} returned {value} for {r.sample_id} (prompt "
                    f"{r.prompt.text!r}, response {r.response_text!r})"
                )
            scored.append(ScoredRollout(r, value))
        return scored


class RewardPool:
    """Splits rollouts into batches and hands each to the next idle reward actor; results come
    back in input order."""

    def __init__(self, actors: list, batch_size: int, on_pending=None) -> None:
        from ray.util import ActorPool

        if not actors:
            raise ValueError("the reward pool needs at least one reward actor")
        self.actors = actors
        self.pool = ActorPool(actors)
        self.batch_size = batch_size
        self.on_pending = on_pending  # callback(batches not yet scored), e.g. a gauge

    def score(self, rollouts: list[Rollout]) -> list[ScoredRollout]:
        batches = [
            rollouts[i : i + self.batch_size] for i in range(0, len(rollouts), self.batch_size)
        ]
        if self.on_pending is not None:
            self.on_pending(len(batches))
        scored = []
        for done, batch in enumerate(
            self.pool.map(lambda actor, batch: actor.score.remote(batch), batches), start=1
        ):
            scored += batch
            if self.on_pending is not None:
                self.on_pending(len(batches) - done)
        return scored
