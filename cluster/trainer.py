"""The driver: runs the stages (offline SFT/DPO and the synchronous RL loop) on the fleet,
verifies every adapter sync, checkpoints and resumes, and writes the run directory."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ..common.config import TrainConfig
from ..common.configio import save_config
from ..common.corpora import LoadedDataset, load_preferences, load_sft
from ..common.data import PromptStream, encode_prompts
from ..common.metrics import MetricsSink, plot_reward_curve, read_metrics, summarize
from ..common.progress import progress
from ..common.records import ScoredRollout
from ..reward.pool import RewardPool, drop_failed_groups
from .checkpoint import ResumeError, TrainerState, latest_checkpoint, rewind
from .fleet import Fleet, connect_ray, is_actor, resolve_model, start_fleet
from .telemetry import DashboardMetrics, WandbLogger, write_rollouts

EVAL_KEYS = ("eval_reward", "eval_greedy")


def fresh_run_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it already holds a run: never overwrite one."""
    candidate, k = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    if candidate != path:
        print(f"{path} already holds a run; writing to {candidate}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def print_summary(run_dir: Path, summary: dict) -> None:
    print(f"\nrun directory: {run_dir}")
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
    print(f"  KL to reference, last {w} iter.    : {summary['kl_last_iterations']:.3f}")
    print(f"  iteration time / wall time        : {summary['mean_step_seconds']:.2f} s / "
          f"{summary['wall_seconds']:.0f} s")


def load_stage_data(cfg: TrainConfig, tokenizer) -> dict[str, LoadedDataset]:
    """The offline stages' datasets, tokenised and checked before any actor starts."""
    loaders = {"sft": (load_sft, cfg.sft.data), "dpo": (load_preferences, cfg.dpo.data)}
    data = {}
    for stage in dict.fromkeys(cfg.stages):
        if stage in loaders:
            load, source = loaders[stage]
            data[stage] = load(source, cfg.task, tokenizer, cfg.model.max_model_len)
            print(f"{stage} data: {data[stage].describe()}")
    return data


def answer_pairs(scored: list[ScoredRollout]) -> list[tuple[str, str]]:
    return [(s.rollout.response_text, s.rollout.prompt.reference) for s in scored]


class LearnerDied(RuntimeError):
    """The learner actor is gone; the run continues only from a checkpoint."""


class Trainer:
    """Runs `cfg.stages` on one fleet: offline stages (sft, dpo) step the learner over a
    dataset, the rl stage runs the rollout/reward/update loop; held-out evaluation after each.
    With `resume=True`, `cfg.run_dir` is an existing run continued from its last checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.resume = resume
        self.fleet: Fleet
        self.dashboard: DashboardMetrics | None = None
        self.wandb: WandbLogger | None = None
        self.stage_evals: list[dict] = []
        self.reward_errors = 0  # failed rewards skipped (reward.on_error=skip)

    # -- reporting ----------------------------------------------------------------------------
    def log(self, row: dict, step: int) -> None:
        self.sink.log(row)
        if self.wandb is not None:
            self.wandb.log(row, step)

    def evaluate(self) -> dict[str, float]:
        """Held-out prompts: mean reward of samples drawn as in training (the quantity RL
        maximises), and of greedy answers (accuracy); plus the task's own metrics of the greedy
        answers (NLU: each task's official metrics and invalid-answer rate)."""
        rollout = self.cfg.rollout
        result = {}
        for key, n, temperature in (
            ("eval_reward", rollout.samples_per_prompt, rollout.temperature),
            ("eval_greedy", 1, 0.0),
        ):
            scored = self.score(self.fleet.generate(
                self.held_out, n=n, temperature=temperature, seed=self.cfg.seed
            ))
            result[key] = sum(s.reward for s in scored) / len(scored)
        return {**result, **self.cfg.task.answer_metrics(answer_pairs(scored))}

    def score(self, rollouts: list) -> list[ScoredRollout]:
        """The reward pool's scores; with reward.on_error=skip, prompts with a failed sample
        are dropped from the batch and counted (`reward_errors`), never silently."""
        scored, errors = drop_failed_groups(self.pool.score(rollouts))
        if errors:
            self.reward_errors += len(errors)
            print(f"{len(errors)} rewards failed (reward.on_error=skip), their prompts left "
                  f"out; first: {errors[0]}", flush=True)
        if not scored:
            raise RuntimeError(f"every reward of the batch failed; first: {errors[0]}")
        return scored

    def checkpoint(self, name: str, next_stage: int, next_iteration: int) -> None:
        """Learner state first, then the driver's: the trainer state file marks it complete."""
        import ray

        directory = self.run_dir / "checkpoints" / name
        ray.get(self.fleet.learner.save_checkpoint.remote(str(directory)))
        TrainerState(
            next_stage, next_iteration, self.stream.cursor, self.sink.lines, self.stage_evals,
            ray.get(self.fleet.learner.get_version.remote()),
        ).write(directory)

    # -- stages -----------------------------------------------------------------------------
    def run_offline_stage(self, stage: str, data: LoadedDataset, index: int) -> None:
        """Shuffled minibatches of the dataset, one learner step each, `epochs` passes."""
        import ray

        section = self.cfg.sft if stage == "sft" else self.cfg.dpo
        learner = self.fleet.learner
        ray.get(learner.start_stage.remote(section.lr))
        batches = []
        for epoch in range(section.epochs):
            order = list(range(len(data.items)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            batches += [
                (epoch, order[i : i + section.batch_size])
                for i in range(0, len(order), section.batch_size)
            ]
        bar = progress(batches, desc=f"stage {index + 1} {stage.upper()}", unit="step")
        for step, (epoch, rows) in enumerate(bar):
            items = [data.items[i] for i in rows]
            call = (
                learner.sft_step.remote(items) if stage == "sft"
                else learner.dpo_step.remote(items, self.cfg.dpo.beta)
            )
            stats = ray.get(call)
            self.log({"stage": stage, "step": step, "epoch": epoch, **vars(stats)},
                     stats.adapter_version)
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)

    def run_rl_stage(self, index: int, first_iteration: int) -> None:
        """`iterations` of: sync adapter, (evaluate), generate, score, update, log."""
        import ray

        cfg, n = self.cfg, self.cfg.rollout.samples_per_prompt
        if first_iteration == 0:
            ray.get(self.fleet.learner.start_stage.remote(cfg.algo.policy_lr))
        bar = progress(
            range(first_iteration, cfg.iterations), desc=cfg.algo.name.upper(), unit="iter",
            initial=first_iteration, total=cfg.iterations,
        )
        for it in bar:
            iter_start = time.perf_counter()
            sync_s, probe_gap, versions = self.fleet.sync_adapter()
            evals = {"eval_reward": None, "eval_greedy": None}
            if it == 0:  # the adapter the previous stage evaluation just measured
                evals = {k: self.stage_evals[-1][k] for k in EVAL_KEYS}
            elif cfg.eval_every and it % cfg.eval_every == 0:
                evals = self.evaluate()
            gen_start = time.perf_counter()
            prompts = self.stream.next_batch(cfg.prompts_per_iteration)
            if self.dashboard:
                self.dashboard.in_flight.set(len(prompts) * n)
            rollouts = self.fleet.generate(
                prompts, n=n, temperature=cfg.rollout.temperature,
                seed=cfg.seed * 7919 + it * 104729,
            )
            gen_s = time.perf_counter() - gen_start
            if self.dashboard:
                self.dashboard.in_flight.set(0)
            tokens = sum(len(r.response_ids) for r in rollouts)
            errors_before = self.reward_errors
            scored = self.score(rollouts)
            stats = ray.get(self.fleet.learner.train_step.remote(scored))
            rewards = [s.reward for s in scored]
            row = {
                "stage": "rl",
                "iteration": it,
                "adapter_version": stats.adapter_version,
                "reward_mean": sum(rewards) / len(rewards),
                **evals,
                "kl": stats.kl,
                "samples": len(scored),
                "rollout_tokens_per_s": tokens / gen_s,
                "step_seconds": time.perf_counter() - iter_start,
                "sync_seconds": sync_s,
                "probe_max_logprob_gap": probe_gap,
                "worker_versions": [versions[i] for i in sorted(versions)],
                "worker_restarts": self.fleet.worker_restarts,
                "reward_errors": self.reward_errors - errors_before,
                **cfg.task.count_invalid(answer_pairs(scored)),  # NLU: "invalid_answers"
                "response_tokens": tokens,
                "prompt_cursor": self.stream.cursor,
                **{k: v for k, v in vars(stats).items() if k not in ("adapter_version", "kl")},
            }
            if cfg.logging.rollouts_parquet:
                write_rollouts(self.run_dir, index, it, scored)
            self.log(row, stats.adapter_version)
            if self.dashboard:
                self.dashboard.iteration(row)
                self.dashboard.worker_versions(versions, stats.adapter_version)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{stats.kl:.4f}", refresh=False)
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
                self.checkpoint(f"iter_{it + 1:05d}", index, it + 1)

    # -- the run ----------------------------------------------------------------------------
    def prepare(self) -> tuple[str, object, dict[str, LoadedDataset]]:
        """Model, tokenizer, prompts and stage datasets, all checked before any actor starts;
        then the run directory (fresh, or rewound to its last checkpoint when resuming)."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        model_path = resolve_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
        too_long: list[str] | None = [] if cfg.rollout.too_long_prompts == "skip" else None
        train = encode_prompts(cfg.task.examples("train"), tokenizer, limit, skipped=too_long)
        self.held_out = encode_prompts(
            cfg.task.examples("eval"), tokenizer, limit, skipped=too_long
        )
        self.prompts_skipped = len(too_long or [])
        if self.prompts_skipped:
            print(f"skipped {self.prompts_skipped} prompts longer than {limit} tokens "
                  f"(rollout.too_long_prompts=skip), e.g. {too_long[0][:60]!r}")
        stage_data = load_stage_data(cfg, tokenizer)
        self.stream = PromptStream(train, cfg.seed)
        self.position = (0, 0)
        if self.resume:
            self.resume_from, state = latest_checkpoint(self.run_dir)
            rewind(self.run_dir, state, self.resume_from)
            self.stream.cursor = state.prompt_cursor
            self.stage_evals = state.stage_evals
            self.position = state.position
            print(f"resuming {self.run_dir} from {self.resume_from.name}: next stage "
                  f"{state.next_stage + 1} of {len(cfg.stages)}, iteration "
                  f"{state.next_iteration}, {state.prompt_cursor} prompts served")
        else:
            # Created only once the inputs are known good: a failed start leaves no half run.
            self.run_dir = fresh_run_dir(self.run_dir)
            cfg.run_dir = str(self.run_dir)
        save_config(cfg, self.run_dir / "config.yaml")
        return model_path, tokenizer, stage_data

    def run(self) -> Path:
        import ray

        cfg = self.cfg
        run_start = time.perf_counter()
        model_path, tokenizer, stage_data = self.prepare()
        probe_ids = [p.token_ids for p in self.held_out[: cfg.rollout.probe_prompts]]
        started_ray = connect_ray(cfg)
        self.fleet = start_fleet(cfg, model_path, tokenizer.pad_token_id, probe_ids)
        self.sink = MetricsSink(self.run_dir)
        if cfg.logging.ray_metrics:
            self.dashboard = DashboardMetrics(self.run_dir.name)
            self.fleet.on_restart = lambda role: self.dashboard.restarts.inc(tags={"role": role})
        self.pool = RewardPool(
            self.fleet.reward_actors, cfg.reward.batch_size,
            on_pending=self.dashboard.reward_queue.set if self.dashboard else None,
        )
        if cfg.logging.wandb:
            self.wandb = WandbLogger(cfg, self.run_dir)
        try:
            summary = self.run_stages(stage_data, run_start)
        except ray.exceptions.RayActorError as exc:
            if not is_actor(exc, self.fleet.learner):
                raise
            raise LearnerDied(self.resume_hint(f"the learner actor died ({exc})")) from exc
        finally:
            self.fleet.kill()
            if self.wandb is not None:
                self.wandb.close()
            if started_ray:
                ray.shutdown()
        if read_metrics(self.run_dir):
            plot_reward_curve(self.run_dir)
        print_summary(self.run_dir, summary)
        return self.run_dir

    def run_stages(self, stage_data: dict[str, LoadedDataset], run_start: float) -> dict:
        import ray

        cfg = self.cfg
        next_stage, next_iteration = self.position
        if self.resume:
            ray.get(self.fleet.learner.load_checkpoint.remote(str(self.resume_from)))
        self.fleet.sync_adapter()
        if not self.stage_evals:
            self.stage_evals = [{"stage": "start", **self.evaluate()}]
        for index in range(next_stage, len(cfg.stages)):
            stage = cfg.stages[index]
            if stage == "rl":
                self.run_rl_stage(index, next_iteration if index == next_stage else 0)
            else:
                self.run_offline_stage(stage, stage_data[stage], index)
            self.fleet.sync_adapter()
            evals = self.evaluate()
            self.stage_evals.append({"stage": stage, **evals})
            self.log({"stage": "eval", "after_stage": index + 1, "after": stage, **evals},
                     ray.get(self.fleet.learner.get_version.remote()))
            self.checkpoint(f"stage{index + 1}_{stage}", index + 1, 0)
        rl_rows = read_metrics(self.run_dir)
        summary = {
            "stages": cfg.stages, "stage_evals": self.stage_evals, "iterations": cfg.iterations,
            **{f"final_{k}": self.stage_evals[-1][k] for k in EVAL_KEYS},
            "datasets": {k: v.describe() for k, v in stage_data.items()},
            "worker_restarts": self.fleet.worker_restarts,
            "reward_errors": self.reward_errors,
            "prompts_skipped_too_long": self.prompts_skipped,
            "resumed_from": str(self.resume_from) if self.resume else None,
            "wall_seconds": time.perf_counter() - run_start,
            **(summarize(rl_rows) if rl_rows else {}),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        ray.get(self.fleet.learner.save.remote(str(self.run_dir / "adapter")))
        return summary

    def resume_hint(self, what: str) -> str:
        try:
            directory, _ = latest_checkpoint(self.run_dir)
            return (f"{what}; continue from its last checkpoint ({directory.name}) with:\n"
                    f"  lorafleet train --resume {self.run_dir}")
        except ResumeError:
            return f"{what}; no checkpoint was written yet, so the run must start again"

