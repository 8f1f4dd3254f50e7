"""The driver: runs a run's stages on one fleet, and the RL loop itself. One RL iteration,
top to bottom (`run_rl_stage`): the workers serve the learner's published adapter (verified
by the probe), the batch is collected from the rollout pipeline and scored, the learner trains
on it, the next version is published and the batch the workers sample next is queued; the
iteration is logged and checkpointed. At rollout.max_staleness 0 (sync) the next batch is
queued behind the new version; at k >= 1 (async) k batches are in flight ahead of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ..common.configio import save_config
from ..common.data import PromptStream
from ..common.metrics import MetricsSink, plot_reward_curve, read_metrics, summarize
from ..common.progress import progress
from ..common.records import Prompt, TrainStats
from ..common.run_dir import RunDir
from ..reward.normalize import RunningMoments
from ..reward.pool import RewardPool, RewardSpec
from ..reward.scoring import Scorer
from ..rollout.worker import POLICY
from .actor_group import is_actor
from .checkpoint import ResumeError, TrainerState, latest_checkpoint, rewind
from .config import TrainConfig
from .evaluation import evaluate_prompts
from .fleet import SyncFigures, connect_ray, start_fleet
from .inputs import load_run_inputs
from .pipeline import RolloutPipeline, ScoredBatch
from .report import EVAL_KEYS, iteration_row, print_summary
from .specs import engine_spec, learner_spec, reward_model_dir, reward_spec
from .stages import run_meet_stage, run_offline_stage, run_rm_stage
from .telemetry import DashboardMetrics, WandbLogger, write_rollouts


class LearnerDied(RuntimeError):
    """The learner actor is gone; the run continues only from a checkpoint."""


@dataclass
class PolicyState:
    """What one policy trained over the fleet owns on the driver: its prompt stream, its
    scorer (reward spec, failed-reward count, running reward statistics) and its metrics sink.
    Its adapter, optimiser and version live on the learner."""

    name: str  # the adapter's name on the learner and its slot on the rollout workers
    stream: PromptStream
    sink: MetricsSink
    scorer: Scorer | None = None  # None: no stage generates, so no reward actors


class Trainer:
    """Runs `cfg.stages` on one fleet: the rm stage trains a reward model on preference pairs,
    the offline stages (sft, dpo) step the learner over a dataset, the meet stage trains one
    control per quality level, the rl stage runs the rollout/reward/update loop; held-out
    evaluation after each policy stage.

    Constructing it checks every input, makes the run directory (fresh; with `resume=True`,
    the existing `cfg.run_dir` rewound to its last checkpoint), starts the fleet (only the
    learner when no stage generates) and publishes the adapter the run starts from, so
    `evaluate` works at once. It stops the fleet on leaving its `with` block:

        with Trainer(cfg) as trainer:
            run_dir = trainer.run()
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        import ray

        self.cfg = cfg
        self.start_time = time.perf_counter()
        self.inputs = inputs = load_run_inputs(cfg)  # all checked before any actor starts
        # -- the run directory, created only once the inputs are known good (a failed start
        # leaves no half run), and where the run stands
        self.stage_evals: list[dict] = []
        self.rm_eval: dict | None = None  # the rm stage's held-out accuracy / margin
        self.position = (0, 0)  # (next stage, next RL iteration)
        self.resume_from: Path | None = None  # the checkpoint a resumed run continues
        stream = PromptStream(inputs.train, cfg.seed)
        moments = RunningMoments()
        if resume:
            self.run_dir = RunDir(cfg.run_dir)
            moments = self.restore(stream)
        else:
            self.run_dir = RunDir.fresh(cfg.run_dir)
        recorded = replace(cfg, run_dir=str(self.run_dir))  # the directory actually written
        save_config(recorded, self.run_dir.config)
        self.policy = PolicyState(POLICY, stream, MetricsSink(self.run_dir))
        self.reward_model = reward_model_dir(cfg, self.run_dir)
        spec = reward_spec(cfg, None if cfg.reward.model_on_learner else self.reward_model)
        # -- what runs beside the driver; all of it stopped by close()
        with ExitStack() as stack:
            if not resume:
                stack.callback(self.run_dir.discard_if_unused)
            self.wandb = WandbLogger(recorded, self.run_dir) if cfg.logging.wandb else None
            if self.wandb is not None:
                stack.callback(self.wandb.close)
            if connect_ray(cfg):
                stack.callback(ray.shutdown)
            self.fleet = start_fleet(
                cfg, learner_spec(cfg, inputs.model_path, inputs.pad_token_id),
                engine_spec(cfg, inputs.model_path, inputs.served_levels), spec,
                inputs.probe_ids(cfg.rollout.probe_prompts),
            )
            stack.callback(self.fleet.kill)
            self.dashboard = None
            if cfg.logging.ray_metrics:
                self.dashboard = DashboardMetrics(self.run_dir.path.name)
                self.fleet.rollout.on_restart = self.dashboard.restarted
            if self.fleet.reward.actors:
                self.policy.scorer = self.make_scorer(spec, moments)
            self.load_learner_state()
            self.fleet.sync_adapter()
            self.running = stack.pop_all()
        self.startup_seconds = time.perf_counter() - self.start_time
        self.start_eval_seconds: float | None = None  # the held-out evaluation before stage 1
        # Called at two fixed points of each RL iteration, for whoever must act at a known
        # place in the loop (the fault-injection tests kill actors there): ("trained", it)
        # once the learner's update of iteration `it` is back and before the next version is
        # published; ("queued", j) right after batch j was queued on the rollout workers.
        self.on_event: Callable[[str, int], None] = lambda event, index: None

    def make_scorer(self, spec: RewardSpec, moments: RunningMoments) -> Scorer:
        import ray

        reward, learner = self.cfg.reward, self.fleet.learner
        pool = RewardPool(self.fleet.reward.actors, reward.batch_size,
                          on_pending=self.dashboard.reward_queue.set if self.dashboard else None)
        return Scorer(
            pool, spec, normalize=reward.normalize, clip=reward.clip,
            learner_scores=(lambda rollouts: ray.get(learner.score_rollouts.remote(rollouts)))
            if reward.model_on_learner else None, moments=moments,
        )

    def restore(self, stream: PromptStream) -> RunningMoments:
        """Where the run stood at its last checkpoint (the logs after it are dropped); returns
        the running reward statistics it had."""
        self.resume_from, state = latest_checkpoint(self.run_dir)
        if "meet" in self.cfg.stages[: state.next_stage]:
            raise ResumeError(f"{self.run_dir}: resuming after a meet stage is not supported "
                              "(its checkpoint does not hold the level controls); start again")
        rewind(self.run_dir, state, self.resume_from)
        stream.cursor = state.prompt_cursor
        self.stage_evals = state.stage_evals
        self.position = state.position
        self.rm_eval = state.rm_eval
        print(f"resuming {self.run_dir} from {self.resume_from.name}: next stage "
              f"{state.next_stage + 1} of {len(self.cfg.stages)}, iteration "
              f"{state.next_iteration}, {state.prompt_cursor} prompts served")
        return RunningMoments(**state.reward_moments)

    def load_learner_state(self) -> None:
        """The checkpoint's weights when resuming, and a reward model the learner serves."""
        import ray

        learner = self.fleet.learner
        if self.resume_from is not None:
            ray.get(learner.load_checkpoint.remote(str(self.resume_from)))
        if self.cfg.reward.model_on_learner and self.cfg.reward.model is not None:
            ray.get(learner.load_reward_model.remote(self.cfg.reward.model))

    def close(self) -> None:
        """Stops the fleet (and wandb, and the Ray cluster if this trainer started it)."""
        self.running.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- reporting ----------------------------------------------------------------------------
    def log(self, row: dict, step: int) -> None:
        """`step`: the policy adapter version (the reward model's step in the rm stage, which
        runs first; wandb steps of the later stages come after its steps)."""
        self.policy.sink.log(row)
        if self.wandb is not None:
            rm_steps = self.rm_eval["steps"] if self.rm_eval and row["stage"] != "rm" else 0
            self.wandb.log(row, step + rm_steps)

    def evaluate(
        self, prompts: list[Prompt] | None = None, slot: str = POLICY
    ) -> dict[str, float]:
        """Held-out prompts (or `prompts`) under the served adapter of `slot`, scored as in
        training (`evaluation.evaluate_prompts`)."""
        return evaluate_prompts(
            partial(self.fleet.generate, slot=slot), self.scorer().score,
            prompts or self.inputs.held_out, self.inputs.task, self.cfg.rollout, self.cfg.seed,
            reward_parts=self.cfg.uses_reward_model,
        )

    def scorer(self) -> Scorer:
        if self.policy.scorer is None:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "reward actors")
        return self.policy.scorer

    def checkpoint(self, name: str, next_stage: int, next_iteration: int,
                   prompt_cursor: int | None = None) -> None:
        """Learner state first, then the driver's: the trainer state file marks it complete.
        `prompt_cursor`: the stream position after the last prompts trained on (None: where
        the stream stands; async mode has drawn further)."""
        import ray

        directory = self.run_dir.checkpoint(name)
        ray.get(self.fleet.learner.save_checkpoint.remote(str(directory)))
        policy = self.policy
        cursor = policy.stream.cursor if prompt_cursor is None else prompt_cursor
        moments = policy.scorer.moments if policy.scorer else RunningMoments()
        TrainerState(
            next_stage, next_iteration, cursor, policy.sink.lines, self.stage_evals,
            ray.get(self.fleet.learner.get_version.remote()), moments.state(), self.rm_eval,
        ).write(directory)

    # -- the RL loop --------------------------------------------------------------------------
    def run_rl_stage(self, index: int, first: int) -> None:
        """Iterations `first`..iterations-1 of the rl stage. Batch j is sampled by the adapter
        the workers hold when it is queued, at most k = rollout.max_staleness versions behind
        the one that trains it: batches first..first+k by the adapter the stage starts from,
        batch j > first + k right after the swap to the version trained on batch j - k - 1.
        While the learner trains batch `it`, the reward actors score batch it + 1 if it is
        in flight (k >= 1). A checkpoint records the cursor of the prompts trained on: batches
        in flight are generated again after a resume."""
        import ray

        cfg, policy, learner = self.cfg, self.policy, self.fleet.learner
        k = cfg.rollout.staleness_bound
        if first == 0:
            ray.get(learner.start_stage.remote(cfg.algo.policy_lr))
        pipeline = RolloutPipeline(self.fleet, self.scorer(), policy.stream, cfg.rollout,
                                   cfg.seed, cfg.prompts_per_iteration)
        bar = progress(range(first, cfg.iterations), desc=cfg.algo.name.upper(), unit="iter",
                       initial=first, total=cfg.iterations)
        iter_start = time.perf_counter()
        sync = self.fleet.sync_adapter()  # the version the first k + 1 batches sample
        for j in range(first, min(first + k + 1, cfg.iterations)):
            self.launch(pipeline, j)
        pending_sync, batch = None, None
        for it in bar:
            if pending_sync is not None:
                sync = self.fleet.finish_sync(pending_sync)  # verified before it trains
            evals = self.iteration_evals(it)
            self.show_in_flight(pipeline)
            batch = batch or pipeline.collect(it)
            train = learner.train_step.remote(batch.train)
            next_batch = pipeline.collect(it + 1) if it + 1 in pipeline.in_flight else None
            pipeline.wait(train)
            stats = ray.get(train)
            self.on_event("trained", it)
            now = time.perf_counter()
            workers_wait = pipeline.workers_idle_seconds(now)
            if it + 1 < cfg.iterations:
                pending_sync = self.fleet.start_sync()
                if it + 1 + k < cfg.iterations:
                    self.launch(pipeline, it + 1 + k)
            row = iteration_row(
                it, batch, evals, stats, sync, self.inputs.task, step_seconds=now - iter_start,
                workers_wait_seconds=workers_wait, worker_restarts=self.fleet.rollout.restarts,
                staleness_bound=k,
            )
            self.record_iteration(bar, index, it, row, batch, stats, sync)
            iter_start, batch = time.perf_counter(), next_batch
        self.show_in_flight(pipeline)

    def launch(self, pipeline: RolloutPipeline, j: int) -> None:
        pipeline.launch(j)
        self.on_event("queued", j)

    def show_in_flight(self, pipeline: RolloutPipeline) -> None:
        if self.dashboard:
            self.dashboard.in_flight.set(pipeline.in_flight_samples())

    def iteration_evals(self, it: int) -> dict:
        if it == 0:  # the adapter the previous stage evaluation just measured
            return {k: self.stage_evals[-1][k] for k in EVAL_KEYS}
        if self.cfg.eval_every and it % self.cfg.eval_every == 0:
            return self.evaluate()
        return {"eval_reward": None, "eval_greedy": None}

    def record_iteration(self, bar, index: int, it: int, row: dict, batch: ScoredBatch,
                         stats: TrainStats, sync: SyncFigures) -> None:
        """Logs the row (metrics.jsonl, dashboard, rollouts Parquet) and checkpoints on
        schedule."""
        cfg = self.cfg
        if cfg.logging.rollouts_parquet:
            write_rollouts(self.run_dir, index, it, batch.scored)
        self.log(row, stats.adapter_version)
        if self.dashboard:
            self.dashboard.iteration(row)
            self.dashboard.worker_versions(sync.versions, stats.adapter_version)
        kl = "-" if stats.kl is None else f"{stats.kl:.4f}"  # None: no reference pass
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=kl, refresh=False)
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            self.checkpoint(f"iter_{it + 1:05d}", index, it + 1, batch.cursor)


    # -- the run ----------------------------------------------------------------------------
    def run(self) -> RunDir:
        """Runs the stages from where the run stands; writes summary.json, the final adapter
        and the reward curve, prints the summary."""
        import ray

        try:
            summary = self.run_stages()
        except ray.exceptions.RayActorError as exc:
            if not is_actor(exc, self.fleet.learner):
                raise
            raise LearnerDied(self.resume_hint(f"the learner actor died ({exc})")) from exc
        if read_metrics(self.run_dir):
            plot_reward_curve(self.run_dir)
        print_summary(self.run_dir, summary)
        return self.run_dir

    def run_stages(self) -> dict:
        import ray

        cfg = self.cfg
        next_stage, next_iteration = self.position
        for index in range(next_stage, len(cfg.stages)):
            stage = cfg.stages[index]
            data = self.inputs.stage_data.get(stage)
            if stage == "rm":  # trains the reward, not the policy: nothing to evaluate
                self.rm_eval = run_rm_stage(cfg, self.fleet.learner, data, index, self.log,
                                            self.run_dir)
                self.checkpoint(f"stage{index + 1}_{stage}", index + 1, 0)
                continue
            if not self.stage_evals:
                start = time.perf_counter()
                self.stage_evals = [{"stage": "start", **self.evaluate()}]
                self.start_eval_seconds = time.perf_counter() - start
            if stage == "meet":
                evals = run_meet_stage(cfg, self.fleet, data, index, self.log, self.evaluate,
                                       self.inputs.level_prompts)
            else:
                if stage == "rl":
                    self.run_rl_stage(index, next_iteration if index == next_stage else 0)
                else:
                    run_offline_stage(cfg, self.fleet.learner, stage, data, index, self.log)
                self.fleet.sync_adapter()
                evals = self.evaluate()
            self.stage_evals.append({"stage": stage, **evals})
            self.log({"stage": "eval", "after_stage": index + 1, "after": stage, **evals},
                     ray.get(self.fleet.learner.get_version.remote()))
            self.checkpoint(f"stage{index + 1}_{stage}", index + 1, 0)
        rl_rows = read_metrics(self.run_dir)
        summary = {
            # the base adapter/ goes with (tiny: the built model)
            "model_path": self.inputs.model_path,
            "stages": cfg.stages, "stage_evals": self.stage_evals, "iterations": cfg.iterations,
            # (an rm-only run trains no policy: nothing evaluated)
            **{f"final_{k}": self.stage_evals[-1][k] for k in EVAL_KEYS if self.stage_evals},
            "datasets": {k: v.describe() for k, v in self.inputs.stage_data.items()},
            "worker_restarts": self.fleet.rollout.restarts,
            "reward_errors": self.policy.scorer.errors if self.policy.scorer else 0,
            "prompts_skipped_too_long": self.inputs.prompts_skipped,
            "resumed_from": None if self.resume_from is None else str(self.resume_from),
            "reward_model": self.reward_model,
            "reward_model_eval": self.rm_eval,
            "wall_seconds": time.perf_counter() - self.start_time,
            # inputs, Ray, the actors, the first adapter sync; then the start evaluation (None:
            # a resumed run does not repeat it)
            "startup_seconds": self.startup_seconds,
            "start_eval_seconds": self.start_eval_seconds,
            "learner_peak_mib": ray.get(self.fleet.learner.peak_memory_mib.remote()),
            **(summarize(rl_rows) if rl_rows else {}),
        }
        self.run_dir.write_summary(summary)
        ray.get(self.fleet.learner.save.remote(str(self.run_dir.adapter)))
        return summary

    def resume_hint(self, what: str) -> str:
        try:
            directory, _ = latest_checkpoint(self.run_dir)
            return (f"{what}; continue from its last checkpoint ({directory.name}) with:\n"
                    f"  lorafleet train --resume {self.run_dir}")
        except ResumeError:
            return f"{what}; no checkpoint was written yet, so the run must start again"

