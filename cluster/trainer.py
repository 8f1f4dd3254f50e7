"""The driver: runs a run's stages on one fleet (start-up, held-out evaluation after each
stage, checkpoints, summaries, a dead learner's resume hint); the rl stage's loop, one
iteration of every policy at once top to bottom, is cluster/rl_loop.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial

from ..common.configio import save_config
from ..common.metrics import plot_reward_curve, read_metrics
from ..common.records import Prompt, UpdateDiverged
from ..common.run_dir import RunDir
from ..common.startup import StartupClock
from ..reward.pool import RewardError, RewardPool
from ..reward.scoring import Scorer
from . import warm
from .actor_group import is_actor
from .checkpoint import ResumeError, TrainerState, latest_checkpoint
from .config import TrainConfig
from .evaluation import evaluate_prompts
from .fleet import start_fleet
from .policy_state import PolicyState, load_policies, place_policies, resume_policies
from .report import (
    policies_summary,
    policy_summary,
    print_summary,
    write_comparison,
)
from .rl_loop import RLStage
from .specs import placement_label, reward_model_dir, reward_spec, run_specs
from .stages import run_meet_stage, run_offline_stage, run_rm_stage
from .telemetry import DashboardMetrics, WandbLogger

# What stops one policy of several (its own reward function, its own update) while the others
# go on; anything else stops the run.
POLICY_FAILURES = (RewardError, UpdateDiverged)
LEARNER_CHECK_S = 60.0  # after a failed call, how long the learner may take to say it lives


class LearnerDied(RuntimeError):
    """The learner actor is gone; the run continues only from a checkpoint."""


class Trainer:
    """Runs `cfg.stages` on one fleet: the rm stage trains a reward model on preference pairs,
    the offline stages (sft, dpo) step the learner over a dataset, the meet stage trains one
    control per quality level, the rl stage runs the rollout/reward/update loop of every
    policy (the run's one, or each of its `policies:`); held-out evaluation after each
    policy stage.

    Constructing it checks every input (every policy's), makes the run directory (fresh; with
    `resume=True`, the existing `cfg.run_dir` rewound to its last checkpoint), starts the fleet
    (only the learner when no stage generates) and publishes the adapters the run starts from,
    so `evaluate` works at once. It stops the fleet on leaving its `with` block:

        with Trainer(cfg) as trainer:
            run_dir = trainer.run()
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:

        self.cfg = cfg
        self.start_time = time.perf_counter()
        self.clock = clock = StartupClock()
        # all checked before any actor starts
        self.policies = policies = load_policies(cfg)
        clock.lap("inputs (data, tokenizer, model files)")
        self.policy = policies[0]  # the one the rm, sft, dpo and meet stages train
        self.inputs = self.policy.inputs
        # -- the run directory, created only once the inputs are known good (a failed start
        # leaves no half run), and where the run stands
        self.rm_eval: dict | None = None  # the rm stage's held-out accuracy / margin
        self.position = (0, 0)  # (next stage, next RL iteration)
        self.resumed_from: str | None = None  # the checkpoint a resumed run continues
        self.run_dir = RunDir(cfg.run_dir) if resume else RunDir.fresh(cfg.run_dir)
        recorded = replace(cfg, run_dir=str(self.run_dir))  # the directory actually written
        place_policies(policies, self.run_dir, resume, self.several)
        if resume:
            self.restore()
        save_config(recorded, self.run_dir.config)
        # the reward actors' own spec: the first policy's (each scorer sends its policy's)
        spec = reward_spec(self.policy.cfg, None if cfg.reward.model_on_learner
                           else reward_model_dir(self.policy.cfg, self.run_dir))
        # -- what runs beside the driver; all of it stopped by close()
        with ExitStack() as stack:
            if not resume:
                stack.callback(self.run_dir.discard_if_unused)
            self.wandb = WandbLogger(recorded, self.run_dir) if cfg.logging.wandb else None
            if self.wandb is not None:
                stack.callback(self.wandb.close)
            self.warm = warm.join_or_connect(cfg, stack)  # `lorafleet up`'s fleet, if up
            clock.lap("Ray")
            print(f"placement: {placement_label(cfg)}", flush=True)
            self.fleet = start_fleet(
                cfg, *run_specs(cfg, policies), spec,
                {p.name: p.inputs.probe_ids(p.cfg.rollout.probe_prompts) for p in policies},
                self.warm.lend if self.warm is not None else None,
            )
            stack.callback(self.fleet.kill)
            clock.lap("actors (their imports, engines, models)")
            self.dashboard = None
            if cfg.logging.ray_metrics:
                self.dashboard = DashboardMetrics(self.run_dir.path.name)
                self.fleet.rollout.on_restart = self.dashboard.restarted
                self.fleet.reward.on_restart = self.dashboard.restarted
            self.reward_pool: RewardPool | None = None  # made with the first scorer
            for policy in policies:
                if self.fleet.reward.actors:
                    policy.scorer = self.make_scorer(policy)
            self.load_learner_state()
            clock.lap("scorers, learner state")
            for policy in self.live():
                self.fleet.sync_adapter(policy.name)
            self.running = stack.pop_all()
        clock.lap("first adapter sync")
        print(clock.line(), flush=True)
        self.startup_seconds = time.perf_counter() - self.start_time
        self.start_eval_seconds: float | None = None  # the held-out evaluation before stage 1
        # Called at two fixed points of each RL iteration, for whoever must act at a known
        # place in the loop (the fault-injection tests kill actors there): ("trained", it)
        # once the learner's update of iteration `it` is back and before the next version is
        # published; ("queued", j) right after batch j was queued on the rollout workers.
        self.on_event: Callable[[str, int], None] = lambda event, index: None

    @property
    def several(self) -> bool:
        """The run has a `policies:` section: each policy writes RUN/<name>/ (one named policy
        too) and one's own failure stops it alone."""
        return bool(self.cfg.policies)

    def live(self) -> list[PolicyState]:
        return [p for p in self.policies if p.stopped is None]

    def make_scorer(self, policy: PolicyState) -> Scorer:
        import ray

        reward, learner = policy.cfg.reward, self.fleet.learner
        if self.reward_pool is None:  # one for every policy: they share its idle actors
            self.reward_pool = RewardPool(
                self.fleet.reward.actors, reward.batch_size, reward.timeout_s,
                on_pending=self.dashboard.reward_queue.set if self.dashboard else None,
                recover=self.fleet.reward.recover)
        pool = self.reward_pool
        model = None if reward.model_on_learner else reward_model_dir(policy.cfg, self.run_dir)
        return Scorer(
            pool, reward_spec(policy.cfg, model), normalize=reward.normalize, clip=reward.clip,
            learner_scores=(lambda rollouts: ray.get(learner.score_rollouts.remote(rollouts)))
            if reward.model_on_learner else None, moments=policy.moments,
        )

    def restore(self) -> None:
        """Where the run stood at its last checkpoint (the logs after it are dropped)."""
        state, name = resume_policies(self.policies, self.run_dir, self.several)
        if "meet" in self.cfg.stages[: state.next_stage]:
            raise ResumeError(f"{self.run_dir}: resuming after a meet stage is not supported "
                              "(its checkpoint does not hold the level controls); start again")
        self.position = state.position
        self.rm_eval = state.rm_eval
        self.resumed_from = name
        print(f"resuming {self.run_dir} from {name}: next stage {state.next_stage + 1} of "
              f"{len(self.cfg.stages)}, iteration {state.next_iteration}, "
              + ", ".join(f"{p.stream.cursor} prompts served" +
                          (f" ({p.name})" if self.several else "") for p in self.live()))

    def load_learner_state(self) -> None:
        """The checkpoints' weights when resuming, and a reward model the learner serves."""
        import ray

        learner = self.fleet.learner
        for policy in self.live():
            if policy.resume_from is not None:
                ray.get(learner.load_checkpoint.remote(str(policy.resume_from), policy.name))
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
    def log(self, row: dict, step: int, policy: PolicyState | None = None) -> None:
        """`step`: the policy adapter version (the reward model's step in the rm stage, which
        runs first; wandb steps of the later stages come after its steps)."""
        policy = policy or self.policy
        policy.sink.log(row)
        if self.wandb is not None:
            rm_steps = self.rm_eval["steps"] if self.rm_eval and row["stage"] != "rm" else 0
            self.wandb.log(row, step + rm_steps, policy.name if self.several else None)

    def evaluate(
        self, prompts: list[Prompt] | None = None, slot: str | None = None,
        policy: PolicyState | None = None,
    ) -> dict[str, float]:
        """Held-out prompts (or `prompts`) of `policy` (the first) under its served adapter
        (or the adapter of `slot`), scored as in training (`evaluation.evaluate_prompts`)."""
        policy = policy or self.policy
        cfg = policy.cfg
        generate = partial(self.fleet.generate, slot=slot or policy.name, rollout=cfg.rollout)
        return evaluate_prompts(
            generate, self.scorer(policy).score, prompts or policy.inputs.held_out,
            policy.inputs.task, cfg.rollout, cfg.seed, reward_parts=cfg.uses_reward_model,
        )

    def scorer(self, policy: PolicyState) -> Scorer:
        if policy.scorer is None:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "reward actors")
        return policy.scorer

    def checkpoint(self, policy: PolicyState, name: str, next_stage: int, next_iteration: int,
                   prompt_cursor: int | None = None) -> None:
        """Learner state first, then the driver's: the trainer state file marks it complete.
        `prompt_cursor`: the stream position after the last prompts trained on (None: where
        the stream stands; async mode has drawn further)."""
        import ray

        learner = self.fleet.learner
        directory = policy.run_dir.checkpoint(name)
        ray.get(learner.save_checkpoint.remote(str(directory), policy.name))
        cursor = policy.stream.cursor if prompt_cursor is None else prompt_cursor
        moments = policy.scorer.moments if policy.scorer else policy.moments
        TrainerState(
            next_stage, next_iteration, cursor, policy.sink.lines, policy.stage_evals,
            ray.get(learner.get_version.remote(policy.name)), moments.state(), self.rm_eval,
        ).write(directory)

    @contextmanager
    def isolated(self, policy: PolicyState) -> Iterator[None]:
        """Around one policy's work: with several policies, its own failure (POLICY_FAILURES)
        stops it alone, reported in its summary; a single policy's stops the run."""
        try:
            yield
        except POLICY_FAILURES as exc:
            if not self.several:
                raise
            self.stop(policy, exc)

    def stop(self, policy: PolicyState, exc: Exception) -> None:
        import ray

        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        policy.stopped = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
        print(f"policy {policy.name} stopped, the others go on: {policy.stopped}", flush=True)
        self.fleet.forget(policy.name)
        self.write_summary(policy)
        if not self.live():
            raise RuntimeError("every policy stopped: " + "; ".join(
                f"{p.name}: {p.stopped}" for p in self.policies))

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> RunDir:
        """Runs the stages from where the run stands; writes each policy's summary.json,
        final adapter and reward curve (and with several policies the run's comparison of
        them), prints the summary."""
        import ray

        try:
            self.run_stages()
        except ray.exceptions.RayError as exc:
            death = self.learner_death(exc)
            if death is None:
                raise
            raise LearnerDied(self.resume_hint(f"the learner actor died ({death})")) from exc
        for policy in self.policies:
            if read_metrics(policy.run_dir):
                plot_reward_curve(policy.run_dir)
        if self.several:
            write_comparison(self.run_dir, self.run_summary())
        else:
            print_summary(self.run_dir, self.policy.run_dir.read_summary())
        return self.run_dir

    def learner_death(self, exc: Exception) -> Exception | None:
        """The learner's death behind a failed call: the error itself, or the learner's own
        when asked (a call that failed on an object the learner made, lost with its node,
        names no dead actor); None while the learner lives."""
        import ray

        if isinstance(exc, ray.exceptions.RayActorError) and is_actor(exc, self.fleet.learner):
            return exc
        try:
            ray.get(self.fleet.learner.__ray_ready__.remote(), timeout=LEARNER_CHECK_S)
        except ray.exceptions.RayActorError as death:
            return death
        except ray.exceptions.GetTimeoutError:  # busy: alive
            pass
        return None

    def run_stages(self) -> None:
        import ray

        cfg = self.cfg
        next_stage, next_iteration = self.position
        for index in range(next_stage, len(cfg.stages)):
            stage = cfg.stages[index]
            data = self.inputs.stage_data.get(stage)
            if stage == "rm":  # trains the reward, not the policy: nothing to evaluate
                self.rm_eval = run_rm_stage(cfg, self.fleet.learner, data, index, self.log,
                                            self.run_dir)
                self.checkpoint(self.policy, f"stage{index + 1}_{stage}", index + 1, 0)
                continue
            if not self.policy.stage_evals:
                start = time.perf_counter()
                for policy in self.live():
                    with self.isolated(policy):
                        policy.stage_evals = [{"stage": "start",
                                               **self.evaluate(policy=policy)}]
                self.start_eval_seconds = time.perf_counter() - start
            if stage == "meet":
                evals = {self.policy.name: run_meet_stage(
                    cfg, self.fleet, data, index, self.log, self.evaluate,
                    self.inputs.level_prompts)}
            else:
                if stage == "rl":
                    RLStage(self).run(index, next_iteration if index == next_stage else 0)
                else:
                    run_offline_stage(cfg, self.fleet.learner, stage, data, index, self.log)
                evals = {}
                for policy in self.live():
                    with self.isolated(policy):
                        self.fleet.sync_adapter(policy.name)
                        evals[policy.name] = self.evaluate(policy=policy)
            for policy in self.live():
                policy.stage_evals.append({"stage": stage, **evals[policy.name]})
                self.log({"stage": "eval", "after_stage": index + 1, "after": stage,
                          **evals[policy.name]},
                         ray.get(self.fleet.learner.get_version.remote(policy.name)), policy)
                self.checkpoint(policy, f"stage{index + 1}_{stage}", index + 1, 0)
        for policy in self.policies:  # a stopped policy's summary says why already
            if policy.stopped is None:
                self.write_summary(policy)
            ray.get(self.fleet.learner.save.remote(str(policy.run_dir.adapter), policy.name))

    def write_summary(self, policy: PolicyState) -> None:
        """The policy's summary.json (a stopped policy's says why, with what it reached)."""
        policy.run_dir.write_summary(policy_summary(
            policy, self.shared_figures(), several=self.several,
            reward_model=reward_model_dir(policy.cfg, self.run_dir), rm_eval=self.rm_eval))

    def run_summary(self) -> dict:
        """The run root's summary.json with several policies."""
        summary = policies_summary(self.policies, self.shared_figures(), self.cfg.iterations,
                                   self.resumed_from)
        self.run_dir.write_summary(summary)
        return summary

    def shared_figures(self) -> dict:
        """What every policy of the run shares: the fleet's restarts and the run's times."""
        import ray

        return {
            "worker_restarts": self.fleet.rollout.restarts,
            "reward_actor_restarts": self.fleet.reward.restarts,
            "reward_batches_resent": sum(p.scorer.pool.resent for p in self.policies
                                         if p.scorer is not None),
            "wall_seconds": time.perf_counter() - self.start_time,
            # inputs, Ray, the actors, the first adapter sync; then the start evaluation (None:
            # a resumed run does not repeat it)
            "startup_seconds": self.startup_seconds,
            "startup_phases": self.clock.phases,  # from the process's start
            "actor_startup": self.fleet.startup,
            "warm_fleet": self.warm.state.address if self.warm is not None else None,
            "start_eval_seconds": self.start_eval_seconds,
            "placement": placement_label(self.cfg),
            "learner_peak_mib": ray.get(self.fleet.learner.peak_memory_mib.remote()),
            "learner_precision": ray.get(self.fleet.learner.precision.remote()),
        }

    def resume_hint(self, what: str) -> str:
        try:
            directory, _ = latest_checkpoint(self.live()[0].run_dir)
            return (f"{what}; continue from its last checkpoint ({directory.name}) with:\n"
                    f"  lorafleet train --resume {self.run_dir}")
        except ResumeError:
            return f"{what}; no checkpoint was written yet, so the run must start again"
