"""The learner and a vLLM engine in one actor (placement.colocate): one process, one bundle,
one torch thread pool, so training and generation take turns on the same cores instead of
three processes contending for them. The engine is rollout worker 0: the driver sends it the
workers' calls (swap, probe, generate) like any worker's, but a policy's adapter reaches it by
reference from the learner in this process, not through the object store, and its probe is
checked like every worker's. The other rollout workers, if any, are fed through the object
store as always.

On a GPU the engine frees its KV cache while the learner trains and takes it back before it
generates again (vLLM's sleep mode: a level-0 pause with `release_kv_cache_memory`, then
`wake_up`; the base weights stay, a LoRA update never changes them). That path has not run
here (no GPU): it is kept small and its engine options are unit-tested only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..common.records import POLICY, AdapterSnapshot, ScoredRollout, TrainStats, UpdateDiverged
from ..common.specs import EngineSpec, LearnerSpec
from ..common.startup import fresh_clock
from ..learner.actor import Learner
from ..rollout.worker import RolloutWorker


class ColocatedLearner(Learner, RolloutWorker):
    """The learner's methods and rollout worker 0's, on one base model in each (PEFT's for
    training, vLLM's for serving)."""

    def __init__(self, spec: LearnerSpec, engine: EngineSpec, worker_id: int = 0) -> None:
        # the engine first: it sets the process's OpenMP threads before vLLM is imported
        RolloutWorker.__init__(self, engine, worker_id)
        Learner.__init__(self, spec)

    def attach(self, spec: LearnerSpec, engine: EngineSpec) -> None:
        """A warm fleet's actor lent to a new job: both halves attached (their `attach`)."""
        startup = fresh_clock(self)
        self.attach_engine(engine)
        startup.lap("engine attached")
        self.build(spec, startup, self.reusable_base(spec))

    def detach(self) -> None:
        RolloutWorker.detach(self)
        Learner.detach(self)

    def load_snapshot(self, snapshot: AdapterSnapshot | None, slot: str = POLICY) -> float:
        """RolloutWorker's swap; `snapshot` None: policy `slot`'s adapter as this learner
        holds it now, by reference (no copy through the object store)."""
        return RolloutWorker.load_snapshot(
            self, self.publish(slot) if snapshot is None else snapshot, slot)

    def train_step(self, batches: dict[str, list[ScoredRollout]]
                   ) -> dict[str, TrainStats | UpdateDiverged]:
        with self.engine_asleep():
            return Learner.train_step(self, batches)

    @contextmanager
    def engine_asleep(self) -> Iterator[None]:
        """On a GPU: the engine's KV cache freed for the update, taken back after it."""
        if not self.sleeps:
            yield
            return
        self.llm.sleep(level=0)
        self.llm.release_kv_cache_memory()
        try:
            yield
        finally:
            self.llm.wake_up()
