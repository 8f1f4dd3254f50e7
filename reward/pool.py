"""The reward pool: several reward actors, fed in batches, each idle actor given the next; a
reward function that never returns, and an actor that stops answering, end within
reward.timeout_s (an error, or the actor restarted and its batch sent again)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..common.config import RewardConfig
from ..common.records import Rollout, ScoredRollout
from ..common.startup import TimedStart, clock
from .normalize import combine_rewards
from .registry import RewardFn, get_reward_fn

if TYPE_CHECKING:
    from .model import LearnedReward


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value; names the sample."""


class StillRunning(Exception):
    """A call waited for until its deadline has not returned (distinct from a TimeoutError
    the reward function itself raises, which is its own failure)."""


class RewardTimeout(RewardError):
    """A reward function did not return within reward.timeout_s; names the batch's samples.
    Never a per-sample failure (reward.on_error=skip does not apply): it stops the run."""


@dataclass(frozen=True)
class RewardSpec:
    """What a reward actor computes: the rules (names in `registry`) with their weights, a
    learned reward model directory (or None: none here, e.g. it is on the learner), and the
    weights of the sum rule_weight * (weighted rules) + model_weight * model."""

    rules: tuple[str, ...]
    rule_weight: float = 1.0
    model: str | None = None
    model_weight: float = 0.0
    threads: int = 1
    skip_errors: bool = False
    weights: tuple[float, ...] | None = None  # one per rule; None: 1.0 each
    fn_settings: tuple[tuple[str, str | None], ...] = ()  # RewardConfig.fn_settings()
    timeout_s: float = RewardConfig.timeout_s  # the reward functions' time on one batch

    def combine(
        self, r: Rollout, parts: dict[str, float | None], model_score: float | None
    ) -> ScoredRollout:
        """The weighted sum of the parts; a rule's None leaves it out of the sum (it does not
        apply), the model part counts only where it was computed (a reward actor without a
        model leaves it to the learner's reward adapter)."""
        for name, value in parts.items():
            if value is not None and not math.isfinite(value):
                return self.failed(f"reward {name!r} returned {value} for {where(r)}", r)
        if model_score is not None and not math.isfinite(model_score):
            return self.failed(f"reward model {self.model!r} returned {model_score} for "
                               f"{where(r)}", r)
        weights = self.weights or (1.0,) * len(self.rules)
        applied = [w * v for w, v in zip(weights, parts.values(), strict=True) if v is not None]
        if not applied:
            return self.failed(f"no reward function applies to {where(r)}: {list(parts)} all "
                               "returned None", r)
        rule = sum(applied)
        model_weight = self.model_weight if model_score is not None else 0.0
        total = combine_rewards(rule, model_score, self.rule_weight, model_weight)
        return ScoredRollout(r, total, rule_reward=rule, model_reward=model_score,
                             rule_parts=parts)

    def failed(self, problem: str, r: Rollout, cause: Exception | None = None) -> ScoredRollout:
        if self.skip_errors:
            return ScoredRollout(r, math.nan, problem)
        raise RewardError(problem) from cause


def reward_inputs(rollouts: list[Rollout]) -> dict[str, list]:
    """A batch as the reward functions take it (`registry`): prompts and completions as
    strings, or as messages for conversational prompts; the token ids; each column as a list."""
    columns = dict.fromkeys(name for r in rollouts for name in r.prompt.columns)
    return {
        "prompts": [r.prompt.conversation or r.prompt.text for r in rollouts],
        "completions": [
            r.response_text if r.prompt.conversation is None
            else [{"role": "assistant", "content": r.response_text}] for r in rollouts
        ],
        "completion_ids": [r.response_ids for r in rollouts],
        **{name: [r.prompt.columns.get(name) for r in rollouts] for name in columns},
    }


def reward_fns(spec: RewardSpec) -> dict[str, RewardFn]:
    """The spec's reward functions by name."""
    settings = dict(spec.fn_settings)
    return {name: get_reward_fn(name, settings=settings) for name in spec.rules}


class RewardWorker(TimedStart):
    """Scores batches of rollouts (run as a Ray actor): each rule on the whole batch, the
    learned reward model on the whole batch, combined by weight. A failing reward raises
    RewardError naming the sample, or with `skip_errors` comes back as a NaN reward carrying
    the error for the driver to count and drop. It scores by its own spec or by the one a
    batch comes with (each policy's own rewards, from one pool of actors)."""

    def __init__(self, spec: RewardSpec) -> None:
        startup = clock(self)
        self.spec = spec
        # each spec's functions, built on its first batch (the actor's own now: a bad one
        # fails the actor's start)
        self.fns: dict[RewardSpec, dict[str, RewardFn]] = {spec: reward_fns(spec)}
        self.models: dict[str, LearnedReward] = {}  # by directory
        startup.lap("reward functions")

    def score(self, rollouts: list[Rollout], spec: RewardSpec | None = None
              ) -> list[ScoredRollout]:
        """The batch's rewards by `spec` (None: the actor's own)."""
        spec = self.spec if spec is None else spec
        if spec not in self.fns:
            self.fns[spec] = reward_fns(spec)
        model_scores = self.model(spec).score(rollouts) if spec.model is not None else None
        deadline = Deadline(spec.timeout_s)
        values = {name: self.rule_values(name, fn, rollouts, deadline)
                  for name, fn in self.fns[spec].items()}
        scored = []
        for i, r in enumerate(rollouts):
            raised = [v[i] for v in values.values() if isinstance(v[i], Exception)]
            if raised:
                scored.append(spec.failed(str(raised[0]), r, raised[0].__cause__))
                continue
            parts = {name: v[i] for name, v in values.items()}
            scored.append(spec.combine(
                r, parts, None if model_scores is None else model_scores[i]
            ))
        return scored

    def model(self, spec: RewardSpec) -> LearnedReward:
        """The spec's learned reward model, loaded on first use: an rm stage writes it after
        the actors start, and an actor that Ray restarts comes back through here too."""
        if spec.model not in self.models:
            from .model import LearnedReward

            self.models[spec.model] = LearnedReward(spec.model, spec.threads)
        return self.models[spec.model]

    def rule_values(self, name: str, fn, rollouts: list[Rollout], deadline: Deadline) -> list:
        """`fn` on the batch: a float or None per sample. If the batch call raises, each
        sample is scored alone to find the ones that raise (their entry is the RewardError).
        A call still running at `deadline` raises RewardTimeout."""
        try:
            values = call_until(deadline, fn, reward_inputs(rollouts))
        except StillRunning:
            ids = [r.sample_id for r in rollouts]
            raise RewardTimeout(
                f"reward {name!r} did not return within reward.timeout_s="
                f"{deadline.timeout_s:g} on a batch of {len(rollouts)} (sample ids "
                f"{', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): fix the function, or "
                "raise reward.timeout_s if it is only slow") from None
        except Exception:
            if len(rollouts) == 1:
                raise
            return [v for r in rollouts for v in self.rule_values_alone(name, fn, r, deadline)]
        if not isinstance(values, (list, tuple)) or len(values) != len(rollouts):
            size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise RewardError(f"reward {name!r} returned {size} values for a batch of "
                              f"{len(rollouts)} ({rollouts[0].sample_id} ...): it must return "
                              "one float or None per completion")
        return [number(name, v, r) for v, r in zip(values, rollouts, strict=True)]

    def rule_values_alone(self, name: str, fn, r: Rollout, deadline: Deadline) -> list:
        try:
            return self.rule_values(name, fn, [r], deadline)
        except RewardTimeout:
            raise
        except Exception as exc:
            error = RewardError(f"reward {name!r} raised on {where(r)}: {exc!r}")
            error.__cause__ = exc
            return [error]


@dataclass(frozen=True)
class Deadline:
    """When a batch's reward functions must be done: `timeout_s` after `start`."""

    timeout_s: float
    start: float = field(default_factory=time.monotonic)

    def seconds_left(self) -> float:
        return max(0.0, self.start + self.timeout_s - time.monotonic())


def call_until(deadline: Deadline, fn: Callable, kwargs: dict):
    """fn(**kwargs) in a thread of its own, waited for until `deadline` (StillRunning after
    it). A thread cannot be stopped: a call that never returns stays behind
    in the actor, a daemon thread that does not hold up the actor's exit."""
    result: Future = Future()

    def run() -> None:
        try:
            result.set_result(fn(**kwargs))
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, name="reward function", daemon=True).start()
    if not wait([result], timeout=deadline.seconds_left()).done:
        raise StillRunning
    return result.result()


def number(name: str, value: object, r: Rollout) -> float | None:
    """A reward function's value as a float (None: it does not apply). A string is refused,
    not parsed: "1.0" from a reward is a bug that float() would hide."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise RewardError(f"reward {name!r} returned {value!r} (a {type(value).__name__}) for "
                          f"{where(r)}: a reward is a number or None")
    return float(value)


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
    back in input order. A batch not answered within twice the actors' reward.timeout_s (their
    own timeout did not fire: the process is stopped, or stuck in C code) gets its actor
    killed for Ray to restart; an actor that died is brought back by `recover(i, error)` (the
    driver's: it waits for Ray's restart, and raises naming the actor once its restarts are
    used up; None: the death is an error) and its batch is sent again (counted: `resent`).
    Several batches' scoring may run at once (`start`): they share the idle actors, so an
    actor only ever has one batch and its answer time is that batch's own."""

    def __init__(self, actors: list, batch_size: int, timeout_s: float, *,
                 on_pending: Callable[[int], None] | None = None,
                 recover: Callable[[int, Exception], object] | None = None) -> None:
        if not actors:
            raise ValueError("the reward pool needs at least one reward actor")
        self.actors = actors
        self.batch_size = batch_size
        self.answer_timeout_s = 2 * timeout_s
        self.on_pending = on_pending  # callback(batches not yet scored), e.g. a gauge
        self.recover = recover
        self.resent = 0  # batches sent again after their actor died or was stuck
        self.idle = list(range(len(actors)))  # actors without a batch of any job

    def score(self, rollouts: list[Rollout], spec: RewardSpec | None = None
              ) -> list[ScoredRollout]:
        """The rewards by `spec` (None: each actor's own), waited for."""
        return self.start(rollouts, spec).wait().result()

    def start(self, rollouts: list[Rollout], spec: RewardSpec | None = None) -> ScoreJob:
        """The scoring of `rollouts` by `spec`, begun; `poll` it until it is done."""
        return ScoreJob(self, rollouts, spec)


class ScoreJob:
    """One call's batches on the pool's actors: each sent when an actor is idle, answered or
    sent again as `poll` finds them."""

    def __init__(self, pool: RewardPool, rollouts: list[Rollout], spec: RewardSpec | None):
        self.pool, self.spec = pool, spec
        size = pool.batch_size
        self.batches = [rollouts[i : i + size] for i in range(0, len(rollouts), size)]
        self.results: list[list[ScoredRollout] | None] = [None] * len(self.batches)
        self.waiting = list(range(len(self.batches)))
        self.running: dict = {}  # ObjectRef -> (actor, batch, time.monotonic() when sent)
        self.stuck: set[int] = set()  # actors killed as stuck, their death not yet seen

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    @property
    def refs(self) -> list:
        """The calls it waits on."""
        return list(self.running)

    def poll(self, timeout_s: float | None) -> bool:
        """Sends waiting batches to idle actors, takes the answers that come within
        `timeout_s` (None: until one does or one is due), kills an actor whose answer is
        overdue; whether every batch is scored."""
        import ray

        pool = self.pool
        if pool.on_pending is not None:
            pool.on_pending(self.results.count(None))
        self.send()
        if not self.running:  # every actor has another job's batch
            time.sleep(0.05 if timeout_s is None else min(timeout_s, 0.05))
            return self.done
        due = [sent + pool.answer_timeout_s - time.monotonic()
               for i, _, sent in self.running.values() if i not in self.stuck]
        wait_s = min([max(0.0, d) for d in due] + ([] if timeout_s is None else [timeout_s]),
                     default=None)
        done, _ = ray.wait(list(self.running), num_returns=1, timeout=wait_s)
        try:
            for ref in done:
                self.answered(ref)
        except BaseException:  # the job ends here: its other actors serve the next jobs
            pool.idle += [i for i, _, _ in self.running.values()]
            self.running.clear()
            raise
        self.send()  # to the actors that just answered
        for i, b, sent in self.running.values():
            if i not in self.stuck and time.monotonic() - sent > pool.answer_timeout_s:
                print(f"reward actor {i} did not answer batch {b} "
                      f"({self.batches[b][0].sample_id} ...) within {pool.answer_timeout_s:g} s"
                      " (2 x reward.timeout_s); killing it for Ray to restart", flush=True)
                ray.kill(pool.actors[i], no_restart=False)
                self.stuck.add(i)
        if self.done and pool.on_pending is not None:
            pool.on_pending(0)
        return self.done

    def send(self) -> None:
        """Waiting batches to the pool's idle actors."""
        pool = self.pool
        while self.waiting and pool.idle:
            i, b = pool.idle.pop(0), self.waiting.pop(0)
            ref = pool.actors[i].score.remote(self.batches[b], self.spec)
            self.running[ref] = (i, b, time.monotonic())

    def wait(self) -> ScoreJob:
        """Polls until every batch is scored; the job itself."""
        while not self.poll(None):
            pass
        return self

    def answered(self, ref) -> None:
        """A batch's answer taken, or its batch queued again once its dead actor is back."""
        import ray

        i, b, _ = self.running.pop(ref)
        try:
            self.results[b] = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if self.pool.recover is None:
                raise
            self.stuck.discard(i)
            self.pool.recover(i, exc)
            self.pool.resent += 1
            self.waiting.insert(0, b)
        finally:
            self.pool.idle.append(i)

    def result(self) -> list[ScoredRollout]:
        """Every rollout's score, in input order (once `done`)."""
        return [s for batch in self.results for s in batch]
