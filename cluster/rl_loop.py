"""The rl stage's loop, one iteration top to bottom (`RLStage.round`), every policy of the run
in each: the workers serve each policy's published adapter (verified by the probe before it
trains), each batch is collected from its policy's rollout pipeline and scored, the learner
trains all of them in one call (one joint update: learner/rl.py), each next version is
published and the batches the workers sample next are queued together (one generation, which
each engine batches across the adapters); every policy's iteration is logged and
checkpointed. At rollout.max_staleness 0 (sync) a policy's next batch is queued behind its new
version; at k >= 1 (async) k batches are in flight ahead of it, the next one collected and
scored while the learner trains."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..common.progress import progress
from ..common.records import TrainStats
from .fleet import AdapterSync, SyncFigures
from .pipeline import RolloutPipeline, ScoredBatch, launch_together
from .policy_state import PolicyState
from .report import EVAL_KEYS, iteration_row
from .telemetry import write_rollouts


@dataclass
class PolicyLoop:
    """Where one policy stands in the rl stage's loop."""

    policy: PolicyState
    pipeline: RolloutPipeline
    staleness: int  # k: batches in flight ahead of the version that trains them
    sync: SyncFigures  # the verified sync of the adapter that sampled the next batch
    pending_sync: AdapterSync | None = None
    batch: ScoredBatch | None = None  # this iteration's, when collected ahead (async)
    iter_start: float = 0.0


class RLStage:
    """The rl stage of a Trainer's run: its policies' loops over the trainer's fleet; a
    policy's own failure is the trainer's to isolate (`Trainer.isolated`)."""

    def __init__(self, trainer) -> None:
        """trainer: the cluster.trainer.Trainer whose run this stage is (its fleet, policies,
        evaluation, logging and checkpoints)."""
        self.trainer = trainer

    def run(self, index: int, first: int) -> None:
        """Iterations `first`..iterations-1 of the rl stage, every policy in each
        (`round`). Batch j of a policy is sampled by the policy's adapter the workers hold
        when it is queued, at most k = its rollout.max_staleness versions behind the one that
        trains it: batches first..first+k by the adapter the stage starts from, batch j >
        first + k right after the swap to the version trained on batch j - k - 1; the batches
        of one j are queued for every policy at once, so each worker's engine batches across
        the policies' adapters. A checkpoint records the cursor of the prompts trained on:
        batches in flight are generated again after a resume."""
        import ray

        cfg, learner = self.trainer.cfg, self.trainer.fleet.learner
        loops = []
        for policy in self.trainer.live():
            if first == 0:
                ray.get(learner.start_stage.remote(policy.cfg.algo.policy_lr, policy.name))
            pipeline = RolloutPipeline(
                self.trainer.fleet, self.trainer.scorer(policy), policy.stream, policy.cfg.rollout,
                policy.cfg.seed, policy.cfg.prompts_per_iteration, policy.name)
            # the version the first k + 1 batches sample
            loops.append(PolicyLoop(policy, pipeline, policy.cfg.rollout.staleness_bound,
                                    self.trainer.fleet.sync_adapter(policy.name)))
        bar = progress(range(first, cfg.iterations), desc=self.progress_label(), unit="iter",
                       initial=first, total=cfg.iterations)
        for loop in loops:
            loop.iter_start = time.perf_counter()
        for j in range(first, min(first + max(loop.staleness for loop in loops) + 1,
                                  cfg.iterations)):
            self.launch([loop for loop in loops if j <= first + loop.staleness], j)
        postfix: dict[str, str] = {}
        for it in bar:
            self.show_in_flight(loops)
            for loop, row, stats in self.round(self.active(loops), index, it):
                postfix |= self.progress_postfix(loop.policy, row, stats)
            bar.set_postfix(postfix, refresh=False)
        self.show_in_flight(loops)

    def round(self, loops: list[PolicyLoop], index: int, it: int
                 ) -> list[tuple[PolicyLoop, dict, TrainStats]]:
        """Iteration `it` of every policy of `loops`: their batches trained in one learner
        call (one joint update), their next versions published and their next batches queued
        together (one generation); returns each trained policy's metrics row and stats."""
        import ray

        batches = {}
        for loop in loops:
            with self.trainer.isolated(loop.policy):
                if loop.pending_sync is not None:  # verified before it trains
                    loop.sync = self.trainer.fleet.finish_sync(loop.pending_sync)
                evals = self.iteration_evals(loop.policy, it)
                batches[loop.policy.name] = (loop, evals, loop.batch or loop.pipeline.collect(it))
        if not batches:
            return []
        train = self.trainer.fleet.learner.train_step.remote(
            {name: batch.train for name, (_, _, batch) in batches.items()})
        ahead = {}  # async: the next batches, collected while the learner trains
        for name, (loop, _, _) in batches.items():
            if it + 1 in loop.pipeline.in_flight:
                with self.trainer.isolated(loop.policy):
                    ahead[name] = loop.pipeline.collect(it + 1)
        loops[0].pipeline.wait(train)
        results = ray.get(train)
        self.trainer.on_event("trained", it)
        now = time.perf_counter()
        trained = []
        for name, (loop, evals, batch) in batches.items():
            if loop.policy.stopped is not None:
                continue
            with self.trainer.isolated(loop.policy):
                stats = results[name]
                if isinstance(stats, Exception):
                    raise stats
                trained.append((loop, evals, batch, stats))
        queued: dict[int, list[PolicyLoop]] = {}
        for loop, *_ in trained:
            if it + 1 < self.trainer.cfg.iterations:
                loop.pending_sync = self.trainer.fleet.start_sync(loop.policy.name)
                if it + 1 + loop.staleness < self.trainer.cfg.iterations:
                    queued.setdefault(it + 1 + loop.staleness, []).append(loop)
        for j, together in queued.items():
            self.launch(together, j)
        rows = []
        for loop, evals, batch, stats in trained:
            row = iteration_row(
                it, batch, evals, stats, loop.sync, loop.policy.inputs.task,
                step_seconds=now - loop.iter_start,
                workers_wait_seconds=loop.pipeline.workers_idle_seconds(now),
                worker_restarts=self.trainer.fleet.rollout.restarts, staleness_bound=loop.staleness,
            )
            self.record_iteration(loop, batch, index, it, row, stats)
            loop.iter_start, loop.batch = time.perf_counter(), ahead.get(loop.policy.name)
            rows.append((loop, row, stats))
        return rows

    def active(self, loops: list[PolicyLoop]) -> list[PolicyLoop]:
        return [loop for loop in loops if loop.policy.stopped is None]

    def launch(self, loops: list[PolicyLoop], j: int) -> None:
        """Batch j of each policy of `loops`, queued together."""
        launch_together(self.trainer.fleet, [(loop.pipeline, j) for loop in loops])
        self.trainer.on_event("queued", j)

    def show_in_flight(self, loops: list[PolicyLoop]) -> None:
        if self.trainer.dashboard:
            self.trainer.dashboard.in_flight.set(sum(loop.pipeline.in_flight_samples()
                                             for loop in self.active(loops)))

    def progress_label(self) -> str:
        if self.trainer.several:
            return f"{len(self.trainer.live())} policies"
        return self.trainer.cfg.algo.name.upper()

    def progress_postfix(self, policy: PolicyState, row: dict, stats: TrainStats) -> dict:
        """The progress bar's figures: each policy's reward, or the one policy's reward and
        KL."""
        if self.trainer.several:
            return {policy.name: f"{row['reward_mean']:.3f}"}
        kl = "-" if stats.kl is None else f"{stats.kl:.4f}"  # None: no reference pass
        return {"reward": f"{row['reward_mean']:.3f}", "kl": kl}

    def iteration_evals(self, policy: PolicyState, it: int) -> dict:
        if it == 0:  # the adapter the previous stage evaluation just measured
            return {k: policy.stage_evals[-1][k] for k in EVAL_KEYS}
        if policy.cfg.eval_every and it % policy.cfg.eval_every == 0:
            return self.trainer.evaluate(policy=policy)
        return {"eval_reward": None, "eval_greedy": None}

    def record_iteration(self, loop: PolicyLoop, batch: ScoredBatch, index: int, it: int,
                         row: dict, stats: TrainStats) -> None:
        """Logs the row (metrics.jsonl, dashboard, rollouts Parquet) and checkpoints on
        schedule."""
        cfg, policy = self.trainer.cfg, loop.policy
        if cfg.logging.rollouts_parquet:
            write_rollouts(policy.run_dir, index, it, batch.scored)
        self.trainer.log(row, stats.adapter_version, policy)
        if self.trainer.dashboard:
            self.trainer.dashboard.iteration(row, policy.name)
            self.trainer.dashboard.worker_versions(loop.sync.versions, stats.adapter_version,
                                           policy.name)
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            self.trainer.checkpoint(policy, f"iter_{it + 1:05d}", index, it + 1, batch.cursor)
