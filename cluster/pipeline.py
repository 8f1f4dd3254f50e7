"""The rollout pipeline of one policy: batches of prompts queued on the rollout workers ahead
of the update that trains them (none ahead at rollout.max_staleness 0, the synchronous loop),
then collected, checked exactly once, scored and normalised as one `ScoredBatch`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..common.config import RolloutConfig
from ..common.data import PromptStream
from ..common.metrics import response_lengths
from ..common.records import POLICY, GenerationRequest, Prompt, ScoredRollout
from ..reward.pool import ScoreJob
from ..reward.scoring import Scorer
from .fleet import Fleet, Generation, generation_request


@dataclass
class ScoredBatch:
    """One iteration's rollouts, scored, and how they were made."""

    scored: list[ScoredRollout]  # as the reward functions scored them
    train: list[ScoredRollout]  # what the learner trains on: the rewards normalised
    reward_stats: dict  # the batch's reward parts and normalisation statistics
    lengths: dict[str, float]  # response_lengths of every rollout generated
    gen_seconds: float  # queued -> last worker done
    reward_errors: int  # failed rewards dropped (reward.on_error=skip)
    cursor: int  # the prompt stream's position after this batch's prompts


@dataclass
class InFlightBatch:
    """A batch on its way: request `index` of `generation` while the workers generate it,
    then its rollouts while the reward pool scores them."""

    generation: Generation
    index: int
    sent: float  # perf_counter when queued
    rollouts: list | None = None  # once generated
    gen_seconds: float = 0.0  # queued -> last worker done
    scoring: ScoreJob | None = None

    @property
    def prompts(self) -> list[Prompt]:
        return self.generation.requests[self.index].prompts

    @property
    def refs(self) -> list:
        return list(self.generation.calls.refs.values())


@dataclass
class FinishTimes:
    """When the driver saw each tracked Ray call finish: while it waits for some calls, it
    timestamps every tracked call that completes (a call that finishes while the driver is
    busy elsewhere is stamped when it next waits)."""

    pending: list = field(default_factory=list)
    finished: dict = field(default_factory=dict)  # ObjectRef -> perf_counter
    since: float = 0.0  # the previous idle_seconds: idle time before it is counted already

    def track(self, refs) -> None:
        self.pending += list(refs)

    def wait(self, refs, timeout_s: float | None = None) -> bool:
        """Blocks until every ref of `refs` is done (tracked or not), or until `timeout_s`
        passed with some still running (None: no limit); whether all are done."""
        import ray

        self.pending += [r for r in refs if r not in self.finished and r not in self.pending]
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while any(r not in self.finished for r in refs):
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            done, self.pending = ray.wait(self.pending, num_returns=1, timeout=left)
            self.finished |= dict.fromkeys(done, time.perf_counter())
            if not done and left is not None and deadline <= time.perf_counter():
                return False
        return True

    def idle_seconds(self, last_calls: list, now: float) -> float:
        """Mean seconds each worker has been idle since its latest call finished (0 while it
        still runs), counting from the previous call of this method at the earliest."""
        import ray

        if self.pending:  # finished while the driver was busy: stamped now (no idle)
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            self.finished |= dict.fromkeys(done, now)
        idle = sum(now - max(self.finished.get(r, now), self.since) for r in last_calls)
        self.since = now
        return idle / len(last_calls)


POLL_S = 1.0  # the longest wait between polls: a reward call's answer may come due meanwhile


def wait_any(refs: list, timeout_s: float) -> None:
    """Until one of `refs` is done, or `timeout_s`."""
    import ray

    if refs:  # the policies of one generation share its calls
        ray.wait(list(dict.fromkeys(refs)), num_returns=1, timeout=timeout_s)
    else:  # a job waits for an actor another job's batch holds
        time.sleep(min(timeout_s, 0.05))


def rollout_seed(seed: int, iteration: int) -> int:
    """The sampling seed of iteration `iteration`'s batch."""
    return seed * 7919 + iteration * 104729


def launch_together(fleet: Fleet, batches: list[tuple[RolloutPipeline, int]]) -> None:
    """Queues batch j of each (pipeline, j) in one generation: every worker gets one call with
    its shard of each, which its engine batches across the policies' adapters."""
    requests = [pipeline.request(j) for pipeline, j in batches]
    generation = fleet.submit_requests(requests)
    for index, (pipeline, j) in enumerate(batches):
        pipeline.launched(j, generation, index)


class RolloutPipeline:
    """Batch j of one policy is generated by the policy's adapter the workers hold when it is
    queued. `launch_together` queues it (behind each worker's earlier requests and adapter
    swaps), `ready(j)` advances it without waiting until it is scored; the loop launches batch
    j right after publishing the version trained on batch j - 1 - max_staleness."""

    def __init__(self, fleet: Fleet, scorer: Scorer, stream: PromptStream, rollout: RolloutConfig,
                 seed: int, batch_prompts: int, policy: str = POLICY) -> None:
        self.fleet, self.scorer, self.stream = fleet, scorer, stream
        self.rollout, self.seed, self.batch_prompts = rollout, seed, batch_prompts
        self.policy = policy
        self.in_flight: dict[int, InFlightBatch] = {}
        self.watch = FinishTimes()
        self.last_request: dict[int, object] = {}  # worker -> its latest generate call

    def request(self, j: int) -> GenerationRequest:
        """Batch j's request: the stream's next prompts."""
        return generation_request(
            self.stream.next_batch(self.batch_prompts), self.rollout,
            n=self.rollout.samples_per_prompt, temperature=self.rollout.temperature,
            seed=rollout_seed(self.seed, j), slot=self.policy,
        )

    def launched(self, j: int, generation: Generation, index: int) -> None:
        batch = InFlightBatch(generation, index, time.perf_counter())
        self.in_flight[j] = batch
        self.watch.track(batch.refs)
        self.last_request.update(generation.calls.refs)

    def in_flight_samples(self) -> int:
        prompts = sum(len(b.prompts) for b in self.in_flight.values())
        return prompts * self.rollout.samples_per_prompt

    def ready(self, j: int) -> ScoredBatch | None:
        """Batch j scored, or None while it is not: advances it without waiting (every
        prompt's rollouts checked once the workers answered, then scored in the reward pool)."""
        pending = self.in_flight[j]
        if pending.scoring is None:
            if not self.watch.wait(pending.refs, timeout_s=0):
                return None
            pending.rollouts = self.fleet.collect_requests(pending.generation, self.watch.wait)[
                pending.index]
            # The calls that answered (one sent again replaced the one that failed); stamped
            # here if another policy's pipeline collected the generation they share.
            self.watch.wait(pending.refs)
            pending.gen_seconds = max(self.watch.finished[ref] for ref in pending.refs
                                      ) - pending.sent
            pending.scoring = self.scorer.start(pending.rollouts)
        if not pending.scoring.poll(0):
            return None
        del self.in_flight[j]
        errors_before = self.scorer.errors
        scored = self.scorer.finish(pending.scoring)
        train, normalize_stats = self.scorer.normalize(scored)
        return ScoredBatch(
            scored, train, {**normalize_stats, **self.scorer.parts_stats(scored)},
            response_lengths(pending.rollouts), pending.gen_seconds,
            self.scorer.errors - errors_before, pending.prompts[-1].index + 1,
        )

    def waiting_on(self, j: int) -> list:
        """The calls batch j waits on: its generation's, then its reward pool's."""
        pending = self.in_flight[j]
        if pending.scoring is None:
            return [r for r in pending.refs if r not in self.watch.finished]
        return pending.scoring.refs

    def workers_idle_seconds(self, now: float) -> float:
        return self.watch.idle_seconds(list(self.last_request.values()), now)
