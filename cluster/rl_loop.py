"""The rl stage's loop, one iteration top to bottom (`RLStage.round`), every policy of the run
in each: the workers serve each policy's published adapter (verified by the probe before it
trains), each batch is collected from its policy's rollout pipeline and scored, the learner
trains all the ready ones in one call (one joint update: learner/rl.py), each next version is
published and the batches the workers sample next are queued together (one generation, which
each engine batches across the adapters); every policy's iteration is logged and
checkpointed. At rollout.max_staleness 0 (sync) a policy's next batch is queued behind its new
version; at k >= 1 (async) k batches are in flight ahead of it, the next one collected and
scored while the learner trains. A policy whose batch is late (a slower reward, say) holds the
others back at most late_policy_wait_s; it then trains in a later round, so each policy keeps
its own iteration count."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..common.progress import progress
from ..common.records import TrainStats
from .fleet import AdapterSync, SyncFigures
from .pipeline import POLL_S, RolloutPipeline, ScoredBatch, launch_together, wait_any
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
    it: int  # the iteration it trains next
    pending_sync: AdapterSync | None = None
    batch: ScoredBatch | None = None  # batch `it`, once scored
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
        queued in one round are queued for every policy at once, so each worker's engine
        batches across the policies' adapters. A checkpoint records the cursor of the prompts
        trained on: batches in flight are generated again after a resume."""
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
                                    self.trainer.fleet.sync_adapter(policy.name), first))
        bar = progress(None, desc=self.progress_label(), unit="iter", initial=first,
                       total=cfg.iterations)
        for loop in loops:
            loop.iter_start = time.perf_counter()
        for j in range(first, min(first + max(loop.staleness for loop in loops) + 1,
                                  cfg.iterations)):
            self.launch([(loop, j) for loop in loops if j <= first + loop.staleness])
        postfix: dict[str, str] = {}
        while live := [loop for loop in self.active(loops) if loop.it < cfg.iterations]:
            self.show_in_flight(loops)
            for loop, row, stats in self.round(live, index):
                postfix |= self.progress_postfix(loop.policy, row, stats)
            # the bar counts the iterations every policy has done
            bar.update(min((loop.it for loop in self.active(loops)), default=cfg.iterations)
                       - bar.n)
            bar.set_postfix(postfix, refresh=False)
        bar.close()
        self.show_in_flight(loops)

    def round(self, loops: list[PolicyLoop], index: int
              ) -> list[tuple[PolicyLoop, dict, TrainStats]]:
        """The next iteration of every policy of `loops` whose batch is ready (`gather`):
        their batches trained in one learner call (one joint update), their next versions
        published and their next batches queued together (one generation); returns each
        trained policy's metrics row and stats."""
        import ray

        for loop in loops:
            if loop.pending_sync is not None:  # verified before it trains
                with self.trainer.isolated(loop.policy):
                    loop.sync = self.trainer.fleet.finish_sync(loop.pending_sync)
                    loop.pending_sync = None
        batches = {}
        for loop in self.gather(self.active(loops)):
            with self.trainer.isolated(loop.policy):
                evals = self.iteration_evals(loop.policy, loop.it)
                batches[loop.policy.name] = (loop, evals, loop.batch, loop.it)
                loop.batch, loop.it = None, loop.it + 1
        if not batches:
            return []
        train = self.trainer.fleet.learner.train_step.remote(
            {name: batch.train for name, (_, _, batch, _) in batches.items()})
        self.wait_training(train, loops)
        results = ray.get(train)
        self.trainer.on_event("trained", min(it for *_, it in batches.values()))
        now = time.perf_counter()
        trained = []
        for name, (loop, evals, batch, it) in batches.items():
            if loop.policy.stopped is not None:
                continue
            with self.trainer.isolated(loop.policy):
                stats = results[name]
                if isinstance(stats, Exception):
                    raise stats
                trained.append((loop, evals, batch, it, stats))
        queued = []
        for loop, _, _, it, _ in trained:
            if it + 1 < self.trainer.cfg.iterations:
                loop.pending_sync = self.trainer.fleet.start_sync(loop.policy.name)
                if it + 1 + loop.staleness < self.trainer.cfg.iterations:
                    queued.append((loop, it + 1 + loop.staleness))
        if queued:
            self.launch(queued)
        rows = []
        for loop, evals, batch, it, stats in trained:
            row = iteration_row(
                it, batch, evals, stats, loop.sync, loop.policy.inputs.task,
                step_seconds=now - loop.iter_start,
                workers_wait_seconds=loop.pipeline.workers_idle_seconds(now),
                worker_restarts=self.trainer.fleet.rollout.restarts, staleness_bound=loop.staleness,
                policies_in_step=len(batches),
            )
            self.record_iteration(loop, batch, index, it, row, stats)
            loop.iter_start = time.perf_counter()
            rows.append((loop, row, stats))
        return rows

    def gather(self, loops: list[PolicyLoop]) -> list[PolicyLoop]:
        """The loops whose batch for their next iteration is scored: waits for the first, then
        for the others at most late_policy_wait_s (null: until every one is); a policy left
        behind trains in a later round, with the policies ready then."""
        limit = self.trainer.cfg.late_policy_wait_s
        first_ready = None
        while True:
            refs = self.poll(loops)
            live = self.active(loops)
            ready = [loop for loop in live if loop.batch is not None]
            late = [loop for loop in live if loop.batch is None]
            if not late:
                return ready
            for loop in late:
                if loop.it not in loop.pipeline.in_flight:
                    raise RuntimeError(f"policy {loop.policy.name!r}: batch {loop.it} was never "
                                       "queued")
            now = time.perf_counter()
            if ready and first_ready is None:
                first_ready = now
            left = None if first_ready is None or limit is None else limit - (now - first_ready)
            if left is not None and left <= 0:
                names = [", ".join(repr(loop.policy.name) for loop in group)
                         for group in (late, ready)]
                print(f"late_policy_wait_s: {limit:g} s since the first batch was ready; "
                      f"{names[0]} still on the way, {names[1]} train without it", flush=True)
                return ready
            wait_any(refs, POLL_S if left is None else min(left, POLL_S))

    def poll(self, loops: list[PolicyLoop]) -> list:
        """Advances the batch in flight of every active loop without waiting (generation
        checked, then scored); the calls those not yet scored wait on."""
        refs = []
        for loop in self.active(loops):
            if loop.batch is not None or loop.it not in loop.pipeline.in_flight:
                continue  # sync mode: queued once the learner has trained its last one
            with self.trainer.isolated(loop.policy):
                loop.batch = loop.pipeline.ready(loop.it)
                if loop.batch is None:
                    refs += loop.pipeline.waiting_on(loop.it)
        return refs

    def wait_training(self, train, loops: list[PolicyLoop]) -> None:
        """Waits for the learner's call; meanwhile the batches in flight are checked and
        scored as they come (async: the next iteration's)."""
        import ray

        while True:
            refs = self.poll(loops)
            if ray.wait([train], timeout=0)[0]:
                return
            wait_any([train, *refs], POLL_S)

    def active(self, loops: list[PolicyLoop]) -> list[PolicyLoop]:
        return [loop for loop in loops if loop.policy.stopped is None]

    def launch(self, batches: list[tuple[PolicyLoop, int]]) -> None:
        """Batch j of each (policy, j), queued together."""
        launch_together(self.trainer.fleet, [(loop.pipeline, j) for loop, j in batches])
        for j in sorted({j for _, j in batches}):
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
