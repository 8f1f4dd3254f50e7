"""From rollouts to the rewards the learner trains on, in one place: the reward pool's scores,
the learner's reward-adapter scores combined in when the learner holds the reward model,
failed rewards dropped with their prompts and counted (reward.on_error=skip), and the
normalisation (reward.normalize, reward.clip) over every actor's scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from ..common.metrics import mean
from ..common.records import Rollout, ScoredRollout
from .normalize import RunningMoments, normalize_rewards
from .pool import RewardError, RewardPool, RewardSpec, ScoreJob, drop_failed_groups


class Scorer:
    """Scores batches for one policy. `learner_scores`: the learner's reward-adapter scores of
    rollouts when the learner holds the reward model (the reward actors then compute the rules
    only), else None."""

    def __init__(
        self, pool: RewardPool, spec: RewardSpec, *,
        normalize: Literal["none", "running"] = "none", clip: float | None = None,
        learner_scores: Callable[[list[Rollout]], list[float]] | None = None,
        moments: RunningMoments | None = None,
    ) -> None:
        self.pool, self.spec = pool, spec
        self.normalize_mode, self.clip = normalize, clip
        self.learner_scores = learner_scores
        # reward.normalize=running statistics (a resumed run's, from its checkpoint)
        self.moments = moments or RunningMoments()
        self.errors = 0  # failed rewards dropped so far (reward.on_error=skip)

    def score(self, rollouts: list[Rollout]) -> list[ScoredRollout]:
        """The combined rewards (`start`, then `finish`), waited for."""
        return self.finish(self.start(rollouts).wait())

    def start(self, rollouts: list[Rollout]) -> ScoreJob:
        """The reward pool's scoring of `rollouts`, begun; poll it, then `finish` it."""
        return self.pool.start(rollouts, self.spec)

    def finish(self, job: ScoreJob) -> list[ScoredRollout]:
        """A done job's combined rewards; with reward.on_error=skip, prompts with a failed
        sample are dropped from the batch and counted (`errors`), never silently."""
        scored = job.result()
        if self.learner_scores is not None:
            ok = [s for s in scored if s.error is None]
            model = iter(self.learner_scores([s.rollout for s in ok]))
            scored = [s if s.error is not None else
                      self.spec.combine(s.rollout, s.rule_parts, next(model))
                      for s in scored]
        scored, errors = drop_failed_groups(scored)
        if errors:
            self.errors += len(errors)
            print(f"{len(errors)} rewards failed (reward.on_error=skip), their prompts left "
                  f"out; first: {errors[0]}", flush=True)
        if not scored:
            raise RewardError(f"every reward of the batch failed; first: {errors[0]}")
        return scored

    def normalize(self, scored: list[ScoredRollout]) -> tuple[list[ScoredRollout], dict]:
        """reward.normalize / reward.clip on a training batch; returns the batch the learner
        sees and the statistics to log."""
        if self.normalize_mode == "none" and self.clip is None:
            return scored, {}
        raw = [s.reward for s in scored]
        running = self.normalize_mode == "running"
        if running:
            self.moments.update(raw)
        values = normalize_rewards(raw, self.moments if running else None, self.clip)
        stats = {"reward_normalized_mean": mean(values)}
        if self.clip is not None:
            stats["reward_clipped_fraction"] = mean([float(abs(v) == self.clip) for v in values])
        if running:
            stats |= {"reward_running_mean": self.moments.mean,
                      "reward_running_std": self.moments.std}
        return [replace(s, reward=v) for s, v in zip(scored, values, strict=True)], stats

    def parts_stats(self, scored: list[ScoredRollout]) -> dict[str, float | None]:
        """The batch's mean of each reward part: rules and model (when a model scores), each
        reward function (when there are several; None: it applies to no sample)."""
        stats: dict[str, float | None] = {}
        if self.spec.model is not None or self.learner_scores is not None:
            stats |= {"reward_rule_mean": mean([s.rule_reward for s in scored]),
                      "reward_model_mean": mean([s.model_reward for s in scored])}
        if len(self.spec.rules) > 1:
            for name in dict.fromkeys(name for s in scored for name in s.rule_parts):
                values = [s.rule_parts[name] for s in scored
                          if s.rule_parts.get(name) is not None]
                stats[f"reward/{name}"] = mean(values) if values else None
        return stats
