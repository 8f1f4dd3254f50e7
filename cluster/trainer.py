"""The driver: runs the stages (offline SFT/DPO/reward model and the synchronous RL loop) on the
fleet, verifies every adapter sync, checkpoints and resumes, and writes the run directory."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from ..common.configio import save_config
from ..common.corpora import (
    DatasetError,
    LoadedDataset,
    level_counts,
    load_leveled,
    load_paired_levels,
    load_preferences,
    load_sft,
)
from ..common.data import (
    PromptStream,
    encode_prompts,
    epoch_batches,
    pad_token_id,
    split_held_out,
)
from ..common.metrics import (
    MetricsSink,
    plot_reward_curve,
    read_metrics,
    response_lengths,
    summarize,
)
from ..common.progress import progress
from ..common.records import Prompt, Rollout, ScoredRollout, TrainStats
from ..common.run_dir import RunDir
from ..common.tasks.registry import build_task
from ..reward.normalize import RunningMoments, normalize_rewards
from ..reward.pool import RewardPool, drop_failed_groups
from ..rollout.worker import POLICY, level_slot
from .actor_group import Calls, is_actor
from .checkpoint import ResumeError, TrainerState, latest_checkpoint, rewind
from .config import TrainConfig
from .evaluation import answer_pairs, evaluate_prompts
from .fleet import (
    AdapterSync,
    connect_ray,
    driver_tokenizer,
    resolve_model,
    reward_model_dir,
    reward_rules,
    reward_spec,
    start_fleet,
)
from .telemetry import DashboardMetrics, WandbLogger, write_rollouts

EVAL_KEYS = ("eval_reward", "eval_greedy")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def print_summary(run_dir: RunDir, summary: dict) -> None:
    print(f"\nrun directory: {run_dir}")
    if summary.get("reward_model_eval"):
        rm = summary["reward_model_eval"]["after"]
        print(f"  reward model, held-out pairs: accuracy {rm['accuracy']:.3f}, mean margin "
              f"{rm['mean_margin']:.3f} ({rm['pairs']} pairs)")
    if summary["stage_evals"]:  # (an rm-only run trains no policy: nothing evaluated)
        print("  held-out reward after each stage   (sampled / greedy):")
    for row in summary["stage_evals"]:
        metrics = "".join(f", {k} {v:.3f}" for k, v in row.items() if "/" in k)
        print(f"    {row['stage']:>5s}: {row['eval_reward']:.3f} / {row['eval_greedy']:.3f}"
              f"{metrics}")
    if "window" not in summary:  # no RL stage
        print(f"  wall time: {summary['wall_seconds']:.0f} s")
        return
    w = summary["window"]
    print(f"  train reward, first {w} iterations : {summary['reward_first_iterations']:.3f}")
    print(f"  train reward, last {w} iterations  : {summary['reward_last_iterations']:.3f}")
    kl = summary["kl_last_iterations"]  # None: no reference pass (kl_coef 0)
    print(f"  KL to reference, last {w} iter.    : {'-' if kl is None else f'{kl:.3f}'}")
    print(f"  iteration time / wall time        : {summary['mean_step_seconds']:.2f} s / "
          f"{summary['wall_seconds']:.0f} s")


def load_stage_data(cfg: TrainConfig, tokenizer) -> dict[str, LoadedDataset]:
    """The offline stages' datasets, tokenised and checked before any actor starts."""
    loaders = {"sft": (load_sft, cfg.sft.data), "dpo": (load_preferences, cfg.dpo.data),
               "rm": (load_preferences, cfg.rm.data)}
    data = {}
    for stage in dict.fromkeys(cfg.stages):
        if stage in loaders:
            load, source = loaders[stage]
            data[stage] = load(source, build_task(cfg.task), tokenizer, cfg.model.max_model_len)
            print(f"{stage} data: {data[stage].describe()}")
    if "meet" in cfg.stages:
        data["meet"] = load_meet_data(cfg, tokenizer)
    return data


def load_meet_data(cfg: TrainConfig, tokenizer) -> LoadedDataset:
    """The meet stage's rows with their levels (prompts led by the control text under
    meet.control=text); a level count the config does not fit is an error."""
    meet = cfg.meet
    if meet.pairs:
        data = load_paired_levels(meet.data, build_task(cfg.task), tokenizer,
                                  cfg.model.max_model_len)
    else:
        data = load_leveled(
            meet.data, meet.level_column, meet.score_column, meet.bins, build_task(cfg.task),
            tokenizer, cfg.model.max_model_len, meet.control_texts,
        )
    counts = level_counts(data.items)
    if meet.best_level is not None and meet.best_level >= len(counts):
        raise DatasetError(f"meet.best_level={meet.best_level}: {data.source} has levels "
                           f"0..{len(counts) - 1}")
    if meet.control == "text" and len(meet.control_texts) != len(counts):
        raise DatasetError(f"meet.control_texts: {len(meet.control_texts)} texts for the "
                           f"{len(counts)} levels of {data.source}")
    print(f"meet data: {data.describe()}, rows per level {counts}")
    return data


def reward_model_report(
    run_dir: RunDir, before: dict, after: dict, data: LoadedDataset, train_pairs: int,
    steps: int,
) -> dict:
    """Write rm_eval.json and print the held-out accuracy / margin before and after."""
    report = {"before": before, "after": after, "train_pairs": train_pairs, "steps": steps,
              "data": data.describe()}
    run_dir.rm_eval.write_text(json.dumps(report, indent=2))
    print(f"reward model on {after['pairs']} held-out pairs: accuracy {before['accuracy']:.3f}"
          f" -> {after['accuracy']:.3f}, mean margin {before['mean_margin']:.3f} -> "
          f"{after['mean_margin']:.3f}", flush=True)
    return report


def encode_task_prompts(cfg: TrainConfig, tokenizer) -> tuple[list[Prompt], list[Prompt], int]:
    """The task's training and held-out prompts, and how many were left out as too long for
    the model (rollout.too_long_prompts=skip; else a prompt too long is an error)."""
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    too_long: list[str] | None = [] if cfg.rollout.too_long_prompts == "skip" else None
    task = build_task(cfg.task)
    train = encode_prompts(task.examples("train"), tokenizer, limit, skipped=too_long)
    held_out = encode_prompts(task.examples("eval"), tokenizer, limit, skipped=too_long)
    if too_long:
        print(f"skipped {len(too_long)} prompts longer than {limit} tokens "
              f"(rollout.too_long_prompts=skip), e.g. {too_long[0][:60]!r}")
    return train, held_out, len(too_long or [])


def control_text_prompts(cfg: TrainConfig, tokenizer, text: str) -> list[Prompt]:
    """The held-out prompts led by a level's control text (Chain of Hindsight)."""
    examples = [replace(ex, prompt=f"{text} {ex.prompt}")
                for ex in build_task(cfg.task).examples("eval")]
    return encode_prompts(examples, tokenizer, cfg.model.max_model_len - cfg.rollout.max_new_tokens)


def reward_part_means(scored: list[ScoredRollout]) -> dict[str, float | None]:
    """Each reward function's mean over the samples it applies to (None: to none of them)."""
    names = dict.fromkeys(name for s in scored for name in s.rule_parts)
    means = {}
    for name in names:
        values = [s.rule_parts[name] for s in scored if s.rule_parts.get(name) is not None]
        means[f"reward/{name}"] = mean(values) if values else None
    return means


@dataclass
class ScoredBatch:
    """One iteration's rollouts, scored (before normalisation), and how they were made."""

    scored: list[ScoredRollout]
    lengths: dict[str, float]  # response_lengths of every rollout generated
    gen_seconds: float  # queued -> last worker done
    reward_errors: int  # failed rewards skipped (reward.on_error=skip)
    cursor: int  # the prompt stream's position after this batch's prompts


@dataclass
class InFlightBatch:
    """A batch the workers are generating (rollout.mode=async)."""

    prompts: list[Prompt]
    calls: Calls
    sent: float  # perf_counter when queued


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

    def wait(self, refs) -> None:
        """Blocks until every ref of `refs` is done (tracked or not)."""
        import ray

        self.pending += [r for r in refs if r not in self.finished and r not in self.pending]
        while any(r not in self.finished for r in refs):
            done, self.pending = ray.wait(self.pending, num_returns=1)
            self.finished[done[0]] = time.perf_counter()

    def idle_seconds(self, last_calls: list, now: float) -> float:
        """Mean seconds each worker has been idle since its latest call finished (0 while it
        still runs), counting from the previous call of this method at the earliest."""
        import ray

        if self.pending:  # finished while the driver was busy: stamped now (no idle)
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            self.finished |= dict.fromkeys(done, now)
        idle = mean([now - max(self.finished.get(r, now), self.since) for r in last_calls])
        self.since = now
        return idle


class LearnerDied(RuntimeError):
    """The learner actor is gone; the run continues only from a checkpoint."""


class Trainer:
    """Runs `cfg.stages` on one fleet: the rm stage trains a reward model on preference pairs,
    the offline stages (sft, dpo) step the learner over a dataset, the rl stage runs the
    rollout/reward/update loop; held-out evaluation after each policy stage.

    Constructing it checks every input, makes the run directory (fresh; with `resume=True`,
    the existing `cfg.run_dir` rewound to its last checkpoint), starts the fleet (only the
    learner when no stage generates) and publishes the adapter the run starts from, so
    `evaluate` and `score` work at once. It stops the fleet on leaving its `with` block:

        with Trainer(cfg) as trainer:
            run_dir = trainer.run()
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        import ray

        self.cfg = cfg
        self.start_time = time.perf_counter()
        # -- inputs, all checked before any actor starts
        reward_rules(cfg)  # a bad reward function fails before the model is built
        self.model_path = resolve_model(cfg)
        tokenizer = driver_tokenizer(cfg, self.model_path)
        train, self.held_out, self.prompts_skipped = encode_task_prompts(cfg, tokenizer)
        reward_rules(cfg, {c for p in train + self.held_out for c in p.columns})
        self.stage_data = load_stage_data(cfg, tokenizer)
        # meet.control=text: each level's held-out prompts, led by its control text
        self.level_prompts = [
            control_text_prompts(cfg, tokenizer, text) for text in cfg.meet.control_texts
        ] if "meet" in cfg.stages else []
        # meet.control=lora|prompt: the levels the rollout workers serve beside the policy
        self.served_levels = (len(level_counts(self.stage_data["meet"].items))
                              if "meet" in cfg.stages and cfg.meet.control != "text" else 0)
        self.stream = PromptStream(train, cfg.seed)
        # -- the run directory, created only once the inputs are known good (a failed start
        # leaves no half run), and where the run stands
        self.stage_evals: list[dict] = []
        self.moments = RunningMoments()  # reward.normalize=running statistics
        self.rm_eval: dict | None = None  # the rm stage's held-out accuracy / margin
        self.position = (0, 0)  # (next stage, next RL iteration)
        self.resume_from: Path | None = None  # the checkpoint a resumed run continues
        if resume:
            self.run_dir = RunDir(cfg.run_dir)
            self.restore()
        else:
            self.run_dir = RunDir.fresh(cfg.run_dir)
        recorded = replace(cfg, run_dir=str(self.run_dir))  # the directory actually written
        save_config(recorded, self.run_dir.config)
        self.sink = MetricsSink(self.run_dir)
        self.reward_errors = 0  # failed rewards skipped (reward.on_error=skip)
        self.reward_model = reward_model_dir(cfg, self.run_dir)
        self.reward_spec = reward_spec(
            cfg, None if cfg.reward.model_on_learner else self.reward_model
        )
        probe_ids = [p.token_ids for p in self.held_out[: cfg.rollout.probe_prompts]]
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
                cfg, self.model_path, pad_token_id(tokenizer), probe_ids, self.reward_spec,
                served_levels=self.served_levels,
            )
            stack.callback(self.fleet.kill)
            self.dashboard = None
            if cfg.logging.ray_metrics:
                self.dashboard = DashboardMetrics(self.run_dir.path.name)
                self.fleet.rollout.on_restart = self.dashboard.restarted
            self.pool = None  # no reward actors when no stage generates
            if self.fleet.reward.actors:
                self.pool = RewardPool(
                    self.fleet.reward.actors, cfg.reward.batch_size,
                    on_pending=self.dashboard.reward_queue.set if self.dashboard else None,
                )
            self.load_learner_state()
            self.fleet.sync_adapter()
            self.running = stack.pop_all()
        self.startup_seconds = time.perf_counter() - self.start_time
        self.start_eval_seconds: float | None = None  # the held-out evaluation before stage 1

    def restore(self) -> None:
        """Where the run stood at its last checkpoint; the logs after it are dropped."""
        self.resume_from, state = latest_checkpoint(self.run_dir)
        if "meet" in self.cfg.stages[: state.next_stage]:
            raise ResumeError(f"{self.run_dir}: resuming after a meet stage is not supported "
                              "(its checkpoint does not hold the level controls); start again")
        rewind(self.run_dir, state, self.resume_from)
        self.stream.cursor = state.prompt_cursor
        self.stage_evals = state.stage_evals
        self.position = state.position
        self.moments = RunningMoments(**state.reward_moments)
        self.rm_eval = state.rm_eval
        print(f"resuming {self.run_dir} from {self.resume_from.name}: next stage "
              f"{state.next_stage + 1} of {len(self.cfg.stages)}, iteration "
              f"{state.next_iteration}, {state.prompt_cursor} prompts served")

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
        self.sink.log(row)
        if self.wandb is not None:
            rm_steps = self.rm_eval["steps"] if self.rm_eval and row["stage"] != "rm" else 0
            self.wandb.log(row, step + rm_steps)

    def evaluate(
        self, prompts: list[Prompt] | None = None, slot: str = POLICY
    ) -> dict[str, float]:
        """Held-out prompts (or `prompts`) under the served adapter of `slot`, sampled and
        greedy (`evaluation.evaluate_prompts`)."""
        return evaluate_prompts(
            partial(self.fleet.generate, slot=slot), self.score, prompts or self.held_out,
            build_task(self.cfg.task), self.cfg.rollout, self.cfg.seed,
            reward_parts=self.cfg.uses_reward_model,
        )

    def score(self, rollouts: list) -> list[ScoredRollout]:
        """The reward pool's scores (plus the learner's reward adapter's, when it holds the
        reward model); with reward.on_error=skip, prompts with a failed sample are dropped
        from the batch and counted (`reward_errors`), never silently."""
        import ray

        if self.pool is None:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "reward actors")
        scored = self.pool.score(rollouts)
        if self.cfg.reward.model_on_learner:
            ok = [s for s in scored if s.error is None]
            model = iter(ray.get(self.fleet.learner.score_rollouts.remote(
                [s.rollout for s in ok]
            )))
            scored = [s if s.error is not None else
                      self.reward_spec.combine(s.rollout, s.rule_parts, next(model))
                      for s in scored]
        scored, errors = drop_failed_groups(scored)
        if errors:
            self.reward_errors += len(errors)
            print(f"{len(errors)} rewards failed (reward.on_error=skip), their prompts left "
                  f"out; first: {errors[0]}", flush=True)
        if not scored:
            raise RuntimeError(f"every reward of the batch failed; first: {errors[0]}")
        return scored

    def normalize(self, scored: list[ScoredRollout]) -> tuple[list[ScoredRollout], dict]:
        """reward.normalize / reward.clip on a training batch; returns the batch the learner
        sees and the statistics to log."""
        reward = self.cfg.reward
        if reward.normalize == "none" and reward.clip is None:
            return scored, {}
        raw = [s.reward for s in scored]
        if reward.normalize == "running":
            self.moments.update(raw)
        values = normalize_rewards(
            raw, self.moments if reward.normalize == "running" else None, reward.clip
        )
        stats = {"reward_normalized_mean": mean(values)}
        if reward.clip is not None:
            stats["reward_clipped_fraction"] = mean([float(abs(v) == reward.clip) for v in values])
        if reward.normalize == "running":
            stats |= {"reward_running_mean": self.moments.mean,
                      "reward_running_std": self.moments.std}
        return [replace(s, reward=v) for s, v in zip(scored, values, strict=True)], stats

    def checkpoint(self, name: str, next_stage: int, next_iteration: int,
                   prompt_cursor: int | None = None) -> None:
        """Learner state first, then the driver's: the trainer state file marks it complete.
        `prompt_cursor`: the stream position after the last prompts trained on (None: where
        the stream stands; async mode has drawn further)."""
        import ray

        directory = self.run_dir.checkpoint(name)
        ray.get(self.fleet.learner.save_checkpoint.remote(str(directory)))
        cursor = self.stream.cursor if prompt_cursor is None else prompt_cursor
        TrainerState(
            next_stage, next_iteration, cursor, self.sink.lines, self.stage_evals,
            ray.get(self.fleet.learner.get_version.remote()), self.moments.state(),
            self.rm_eval,
        ).write(directory)

    # -- stages -----------------------------------------------------------------------------
    def run_offline_stage(self, stage: str, data: LoadedDataset, index: int) -> None:
        """Shuffled minibatches of the dataset, one learner step each, `epochs` passes; the rm
        stage trains the reward adapter on all but its held-out pairs."""
        import ray

        cfg = self.cfg
        section = {"sft": cfg.sft, "dpo": cfg.dpo, "rm": cfg.rm}[stage]
        learner = self.fleet.learner
        items = data.items
        if stage == "rm":
            items, held_out = split_held_out(items, cfg.rm.eval_fraction, cfg.seed)
            ray.get(learner.start_reward_model.remote(section.lr))
            before = ray.get(learner.rm_evaluate.remote(held_out))
        else:
            ray.get(learner.start_stage.remote(section.lr))
        step_call = {
            "sft": learner.sft_step.remote,
            "dpo": lambda batch: learner.dpo_step.remote(batch, cfg.dpo.beta),
            "rm": learner.rm_step.remote,
        }[stage]
        batches = epoch_batches(len(items), section.batch_size, section.epochs, cfg.seed)
        bar = progress(batches, desc=f"stage {index + 1} {stage.upper()}", unit="step")
        for step, (epoch, rows) in enumerate(bar):
            stats = ray.get(step_call([items[i] for i in rows]))
            self.log({"stage": stage, "step": step, "epoch": epoch, **vars(stats)},
                     stats.adapter_version)
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        if stage == "rm":
            after = ray.get(learner.rm_evaluate.remote(held_out))
            self.rm_eval = reward_model_report(
                self.run_dir, before, after, data, len(items), len(batches)
            )
            ray.get(learner.save_reward_model.remote(
                str(self.run_dir.reward_model), {"eval": after, "eval_before": before,
                                                 "data": data.describe()}
            ))

    def run_meet_stage(self, data: LoadedDataset, index: int) -> dict:
        """Stage 1 (each level's control alone), then stage 2 (the controls with the shared
        policy LoRA), each on shuffled minibatches of every level's rows; then every level's
        held-out evaluation, and the best level's adapter becomes the policy the later stages
        continue from. Returns the best level's evaluation with each level's mean reward,
        sampled and greedy (`meet/level{k}_sampled`, `meet/level{k}_greedy`)."""
        import ray

        meet, learner = self.cfg.meet, self.fleet.learner
        levels = len(level_counts(data.items))
        best = levels - 1 if meet.best_level is None else meet.best_level
        ray.get(learner.start_meet.remote(meet.control, levels, meet.control_size))
        phases = [(1, meet.stage1_epochs, meet.stage1_lr), (2, meet.stage2_epochs, meet.stage2_lr)]
        for phase, epochs, lr in phases:
            if not epochs:
                continue
            ray.get(learner.start_meet_phase.remote(lr, phase == 2))
            batches = epoch_batches(len(data.items), meet.batch_size, epochs, self.cfg.seed)
            bar = progress(batches, desc=f"stage {index + 1} MEET-{phase}", unit="step")
            for step, (epoch, rows) in enumerate(bar):
                stats = ray.get(learner.meet_step.remote([data.items[i] for i in rows]))
                self.log({"stage": "meet", "phase": phase, "step": step, "epoch": epoch,
                          **vars(stats)}, stats.adapter_version)
                bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        ray.get(learner.use_level.remote(best))
        self.fleet.sync_adapter()  # the policy the later stages continue from
        if meet.control == "text":  # that policy (the shared LoRA) under each level's text
            per_level = {k: self.evaluate(self.level_prompts[k]) for k in range(levels)}
        else:  # every level served at once beside it, each chosen per request
            self.fleet.sync_levels(levels)
            per_level = {k: self.evaluate(slot=level_slot(k)) for k in range(levels)}
        kinds = [("sampled", "eval_reward"), ("greedy", "eval_greedy")]
        if self.cfg.uses_reward_model:  # each level's reward-model score too
            kinds += [("sampled_model", "eval_reward_model"), ("greedy_model", "eval_greedy_model")]
        return {**per_level[best], **{
            f"meet/level{k}_{kind}": per_level[k][key] for k in range(levels) for kind, key in kinds
        }}

    def run_rl_stage(self, index: int, first_iteration: int) -> None:
        """`iterations` of: sync adapter, (evaluate), generate, score, update, log; with
        rollout.mode=async the workers generate the next batches during the update."""
        import ray

        cfg = self.cfg
        if first_iteration == 0:
            ray.get(self.fleet.learner.start_stage.remote(cfg.algo.policy_lr))
        bar = progress(
            range(first_iteration, cfg.iterations), desc=cfg.algo.name.upper(), unit="iter",
            initial=first_iteration, total=cfg.iterations,
        )
        if cfg.rollout.mode == "async":
            self.run_async_iterations(index, first_iteration, bar)
        else:
            self.run_sync_iterations(index, bar)

    def run_sync_iterations(self, index: int, bar) -> None:
        import ray

        cfg, n = self.cfg, self.cfg.rollout.samples_per_prompt
        for it in bar:
            iter_start = time.perf_counter()
            sync = self.fleet.sync_adapter()
            evals = self.iteration_evals(it)
            gen_start = time.perf_counter()
            prompts = self.stream.next_batch(cfg.prompts_per_iteration)
            if self.dashboard:
                self.dashboard.in_flight.set(len(prompts) * n)
            rollouts = self.fleet.generate(
                prompts, n=n, temperature=cfg.rollout.temperature, seed=self.rollout_seed(it),
            )
            gen_s = time.perf_counter() - gen_start
            if self.dashboard:
                self.dashboard.in_flight.set(0)
            batch = self.scored_batch(rollouts, gen_s)
            normalized, reward_stats = self.normalize(batch.scored)
            stats = ray.get(self.fleet.learner.train_step.remote(normalized))
            row = self.iteration_row(it, batch, reward_stats, evals, stats, iter_start, sync)
            self.record_iteration(bar, index, it, row, batch, stats, sync[2])

    def run_async_iterations(self, index: int, first: int, bar) -> None:
        """rollout.mode=async: batch j is generated by the adapter the workers hold when it is
        queued, at most k = rollout.max_staleness versions behind the one that trains it
        (batches first..first+k by the adapter the stage starts from; batch j > first + k
        queued right after the swap to the version trained on batch j - k). While the learner
        trains batch `it`, the workers generate and the reward actors score batch it + 1.
        The learner checks each version's probe before its next update (so with k >= 2 it
        waits for the requests queued before that swap). A checkpoint records the cursor of
        the prompts trained on: in-flight batches are generated again after a resume."""
        import ray

        cfg, n, k = self.cfg, self.cfg.rollout.samples_per_prompt, self.cfg.rollout.staleness_bound
        in_flight: dict[int, InFlightBatch] = {}
        watch = FinishTimes()
        last_request: dict[int, object] = {}  # worker -> its latest generate call

        def launch(j: int) -> None:
            if j < cfg.iterations:
                prompts = self.stream.next_batch(cfg.prompts_per_iteration)
                calls = self.fleet.submit_generate(
                    prompts, n=n, temperature=cfg.rollout.temperature, seed=self.rollout_seed(j))
                in_flight[j] = InFlightBatch(prompts, calls, time.perf_counter())
                watch.track(calls.refs.values())
                last_request.update(calls.refs)

        def collect(j: int) -> ScoredBatch:
            pending = in_flight.pop(j)
            refs = list(pending.calls.refs.values())
            watch.wait(refs)
            rollouts = self.fleet.collect_generate(pending.prompts, pending.calls, n)
            gen_s = max(watch.finished[ref] for ref in refs) - pending.sent
            return self.scored_batch(rollouts, gen_s, cursor=pending.prompts[-1].index + 1)

        iter_start = time.perf_counter()
        sync_figures = self.fleet.sync_adapter()  # the version the first k + 1 batches sample
        for j in range(first, first + k + 1):
            launch(j)
        batch = collect(first)
        pending_sync: AdapterSync | None = None
        for it in bar:
            if pending_sync is not None:
                sync_figures = self.fleet.finish_sync(pending_sync)
            evals = self.iteration_evals(it)
            normalized, reward_stats = self.normalize(batch.scored)
            train = self.fleet.learner.train_step.remote(normalized)
            next_batch = collect(it + 1) if it + 1 in in_flight else None  # overlaps the update
            watch.wait([train])
            stats = ray.get(train)
            sent = time.perf_counter()
            workers_wait = watch.idle_seconds(list(last_request.values()), sent)
            if it + 1 < cfg.iterations:
                pending_sync = self.fleet.start_sync()
                launch(it + 1 + k)
            row = self.iteration_row(it, batch, reward_stats, evals, stats, iter_start,
                                     sync_figures)
            lags = [stats.adapter_version - s.rollout.adapter_version for s in batch.scored]
            row |= {
                "staleness_histogram": [lags.count(lag) for lag in range(k + 1)],
                "samples_per_s": len(batch.scored) / row["step_seconds"],
                "learner_wait_seconds": row["step_seconds"] - stats.train_seconds,
                "workers_wait_seconds": workers_wait,
            }
            self.record_iteration(bar, index, it, row, batch, stats, sync_figures[2])
            iter_start, batch = time.perf_counter(), next_batch

    def rollout_seed(self, iteration: int) -> int:
        return self.cfg.seed * 7919 + iteration * 104729

    def iteration_evals(self, it: int) -> dict:
        if it == 0:  # the adapter the previous stage evaluation just measured
            return {k: self.stage_evals[-1][k] for k in EVAL_KEYS}
        if self.cfg.eval_every and it % self.cfg.eval_every == 0:
            return self.evaluate()
        return {"eval_reward": None, "eval_greedy": None}

    def scored_batch(self, rollouts: list[Rollout], gen_s: float,
                     cursor: int | None = None) -> ScoredBatch:
        """A generated batch scored; `cursor`: the prompt stream's position after it (None:
        where the stream stands)."""
        errors_before = self.reward_errors
        lengths = response_lengths(rollouts)
        scored = self.score(rollouts)
        return ScoredBatch(scored, lengths, gen_s, self.reward_errors - errors_before,
                           self.stream.cursor if cursor is None else cursor)

    def iteration_row(self, it: int, batch: ScoredBatch, reward_stats: dict, evals: dict,
                      stats: TrainStats, iter_start: float,
                      sync: tuple[float, float, dict[int, int]]) -> dict:
        """The iteration's metrics.jsonl row."""
        cfg, scored = self.cfg, batch.scored
        sync_s, probe_gap, versions = sync
        if cfg.uses_reward_model:
            reward_stats |= {"reward_rule_mean": mean([s.rule_reward for s in scored]),
                             "reward_model_mean": mean([s.model_reward for s in scored])}
        if len(self.reward_spec.rules) > 1:
            reward_stats |= reward_part_means(scored)
        return {
            "stage": "rl",
            "iteration": it,
            "adapter_version": stats.adapter_version,
            "reward_mean": mean([s.reward for s in scored]),  # before normalisation
            **reward_stats,
            **evals,
            "kl": stats.kl,
            "samples": len(scored),
            "rollout_tokens_per_s": batch.lengths["response_tokens"] / batch.gen_seconds,
            "step_seconds": time.perf_counter() - iter_start,
            "sync_seconds": sync_s,
            "probe_max_logprob_gap": probe_gap,
            "worker_versions": [versions[i] for i in sorted(versions)],
            "worker_restarts": self.fleet.rollout.restarts,
            "reward_errors": batch.reward_errors,
            **build_task(cfg.task).count_invalid(answer_pairs(scored)),  # NLU: invalid_answers
            **batch.lengths,
            "prompt_cursor": batch.cursor,
            **{k: v for k, v in vars(stats).items() if k not in ("adapter_version", "kl")},
        }

    def record_iteration(self, bar, index: int, it: int, row: dict, batch: ScoredBatch,
                         stats: TrainStats, versions: dict[int, int]) -> None:
        """Logs the row (metrics.jsonl, dashboard, rollouts Parquet) and checkpoints on
        schedule."""
        cfg = self.cfg
        if cfg.logging.rollouts_parquet:
            write_rollouts(self.run_dir, index, it, batch.scored)
        self.log(row, stats.adapter_version)
        if self.dashboard:
            self.dashboard.iteration(row)
            self.dashboard.worker_versions(versions, stats.adapter_version)
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
            if stage == "rm":  # trains the reward, not the policy: nothing to evaluate
                self.run_offline_stage(stage, self.stage_data[stage], index)
                self.checkpoint(f"stage{index + 1}_{stage}", index + 1, 0)
                continue
            if not self.stage_evals:
                start = time.perf_counter()
                self.stage_evals = [{"stage": "start", **self.evaluate()}]
                self.start_eval_seconds = time.perf_counter() - start
            if stage == "meet":
                evals = self.run_meet_stage(self.stage_data[stage], index)
            else:
                if stage == "rl":
                    self.run_rl_stage(index, next_iteration if index == next_stage else 0)
                else:
                    self.run_offline_stage(stage, self.stage_data[stage], index)
                self.fleet.sync_adapter()
                evals = self.evaluate()
            self.stage_evals.append({"stage": stage, **evals})
            self.log({"stage": "eval", "after_stage": index + 1, "after": stage, **evals},
                     ray.get(self.fleet.learner.get_version.remote()))
            self.checkpoint(f"stage{index + 1}_{stage}", index + 1, 0)
        rl_rows = read_metrics(self.run_dir)
        summary = {
            "model_path": self.model_path,  # the base adapter/ goes with (tiny: the built model)
            "stages": cfg.stages, "stage_evals": self.stage_evals, "iterations": cfg.iterations,
            # (an rm-only run trains no policy: nothing evaluated)
            **{f"final_{k}": self.stage_evals[-1][k] for k in EVAL_KEYS if self.stage_evals},
            "datasets": {k: v.describe() for k, v in self.stage_data.items()},
            "worker_restarts": self.fleet.rollout.restarts,
            "reward_errors": self.reward_errors,
            "prompts_skipped_too_long": self.prompts_skipped,
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

