"""The reward pool: several reward actors, fed in batches, load-balanced by Ray's ActorPool."""

from __future__ import annotations

import math

from ..common.records import Rollout, ScoredRollout
from .rules import get_reward_fn


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value; names the sample."""


class RewardWorker:
    """Scores batches of rollouts with one reward function (run as a Ray actor). A failing
    reward raises RewardError naming the sample, or with `skip_errors` comes back as a NaN
    reward carrying the error for the driver to count and drop."""

    def __init__(self, fn_name: str, skip_errors: bool = False) -> None:
        self.fn_name = fn_name
        self.fn = get_reward_fn(fn_name)
        self.skip_errors = skip_errors

    def score(self, rollouts: list[Rollout]) -> list[ScoredRollout]:
        return [self.score_one(r) for r in rollouts]

    def score_one(self, r: Rollout) -> ScoredRollout:
        where = f"{r.sample_id} (prompt {r.prompt.text!r}, response {r.response_text!r})"
        try:
            value = float(self.fn(r.response_text, r.prompt.reference))
        except Exception as exc:
            problem, cause = f"reward {self.fn_name!r} raised on {where}: {exc!r}", exc
        else:
            if math.isfinite(value):
                return ScoredRollout(r, value)
            problem, cause = f"reward {self.fn_name!r} returned {value} for {where}", None
        if self.skip_errors:
            return ScoredRollout(r, math.nan, problem)
        raise RewardError(problem) from cause


def drop_failed_groups(scored: list[ScoredRollout]) -> tuple[list[ScoredRollout], list[str]]:
    """Without every prompt whose samples include a failed reward (group baselines need all n
    samples); returns (kept, errors of the failed samples)."""
    errors = [s.error for s in scored if s.error is not None]
    failed = {s.rollout.prompt.index for s in scored if s.error is not None}
    return [s for s in scored if s.rollout.prompt.index not in failed], errors


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
