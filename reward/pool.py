"""The reward pool: several reward actors, fed in batches, load-balanced by Ray's ActorPool."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..common.records import Rollout, ScoredRollout
from .normalize import combine_rewards
from .registry import get_reward_fn

if TYPE_CHECKING:
    from .model import LearnedReward


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value; names the sample."""


@dataclass(frozen=True)
class RewardSpec:
    """What a reward actor computes: the rule (a name in `registry`), a learned reward model
    directory (or None: none here, e.g. it is on the learner), and the weights of the sum."""

    rule: str
    rule_weight: float = 1.0
    model: str | None = None
    model_weight: float = 0.0
    threads: int = 1
    skip_errors: bool = False

    def combine(self, r: Rollout, rule: float, model_score: float | None) -> ScoredRollout:
        """The weighted sum of the parts; the model part counts only where it was computed
        (a reward actor without a model leaves it to the learner's reward adapter)."""
        for kind, name, value in (("reward", self.rule, rule),
                                  ("reward model", self.model, model_score)):
            if value is not None and not math.isfinite(value):
                return self.failed(f"{kind} {name!r} returned {value} for {where(r)}", r)
        model_weight = self.model_weight if model_score is not None else 0.0
        total = combine_rewards(rule, model_score, self.rule_weight, model_weight)
        return ScoredRollout(r, total, rule_reward=rule, model_reward=model_score)

    def failed(self, problem: str, r: Rollout, cause: Exception | None = None) -> ScoredRollout:
        if self.skip_errors:
            return ScoredRollout(r, math.nan, problem)
        raise RewardError(problem) from cause


class RewardWorker:
    """Scores batches of rollouts (run as a Ray actor): the rule on each sample, the learned
    reward model on the whole batch, combined by weight. A failing reward raises RewardError
    naming the sample, or with `skip_errors` comes back as a NaN reward carrying the error for
    the driver to count and drop."""

    def __init__(self, spec: RewardSpec) -> None:
        self.spec = spec
        self.fn = get_reward_fn(spec.rule)
        self.model: LearnedReward | None = None

    def score(self, rollouts: list[Rollout]) -> list[ScoredRollout]:
        if self.spec.model is not None and self.model is None:
            # Loaded on first use: an rm stage writes it after the actors start, and an actor
            # that Ray restarts comes back through here too.
            from .model import LearnedReward

            self.model = LearnedReward(self.spec.model, self.spec.threads)
        model_scores = self.model.score(rollouts) if self.model is not None else None
        return [
            self.score_one(r, None if model_scores is None else model_scores[i])
            for i, r in enumerate(rollouts)
        ]

    def score_one(self, r: Rollout, model_score: float | None) -> ScoredRollout:
        try:
            rule = float(self.fn(r.response_text, r.prompt.reference))
        except Exception as exc:
            return self.spec.failed(f"reward {self.spec.rule!r} raised on {where(r)}: {exc!r}",
                                    r, exc)
        return self.spec.combine(r, rule, model_score)


def where(r: Rollout) -> str:
    return f"{r.sample_id} (prompt {r.prompt.text!r}, response {r.response_text!r})"


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
