"""What a run reports: each RL iteration's metrics.jsonl row, the reward model's held-out
report, summary.json, and the summary printed at the end."""

from __future__ import annotations

import json

from ..common.corpora import LoadedDataset
from ..common.metrics import mean, read_metrics, summarize
from ..common.records import TrainStats
from ..common.run_dir import RunDir
from ..common.tasks.base import Task
from .evaluation import answer_pairs
from .fleet import SyncFigures
from .pipeline import ScoredBatch
from .policy_state import PolicyState

EVAL_KEYS = ("eval_reward", "eval_greedy")


def iteration_row(
    it: int, batch: ScoredBatch, evals: dict, stats: TrainStats, sync: SyncFigures, task: Task,
    *, step_seconds: float, workers_wait_seconds: float, worker_restarts: int,
    staleness_bound: int, policies_in_step: int,
) -> dict:
    """The iteration's metrics.jsonl row; `policies_in_step`: how many policies' batches the
    learner call that trained it held."""
    scored = batch.scored
    lags = [stats.adapter_version - s.rollout.adapter_version for s in scored]
    return {
        "stage": "rl",
        "iteration": it,
        "adapter_version": stats.adapter_version,
        "reward_mean": mean([s.reward for s in scored]),  # before normalisation
        **batch.reward_stats,
        **evals,
        "kl": stats.kl,
        "samples": len(scored),
        "rollout_tokens_per_s": batch.lengths["response_tokens"] / batch.gen_seconds,
        "step_seconds": step_seconds,
        "sync_seconds": sync.seconds,
        "probe_max_logprob_gap": sync.probe_gap,
        "worker_versions": [sync.versions[i] for i in sorted(sync.versions)],
        "worker_restarts": worker_restarts,
        "reward_errors": batch.reward_errors,
        **task.count_invalid(answer_pairs(scored)),  # NLU: invalid_answers
        **batch.lengths,
        "prompt_cursor": batch.cursor,
        **{k: v for k, v in vars(stats).items() if k not in ("adapter_version", "kl")},
        # how far behind the trained version each sample's adapter was (all 0 in sync mode)
        "staleness_histogram": [lags.count(lag) for lag in range(staleness_bound + 1)],
        "samples_per_s": len(scored) / step_seconds,
        "learner_wait_seconds": step_seconds - stats.train_seconds,
        "workers_wait_seconds": workers_wait_seconds,
        "policies_in_step": policies_in_step,
    }


def policy_summary(policy: PolicyState, shared: dict, *, several: bool, reward_model: str | None,
                   rm_eval: dict | None) -> dict:
    """A policy's summary.json: its evaluations and headline figures (`summarize`), with the
    run's `shared` ones (Trainer.shared_figures)."""
    cfg, rows = policy.cfg, read_metrics(policy.run_dir)
    return {
        # the base adapter/ goes with (tiny: the built model)
        "model_path": policy.inputs.model_path,
        **({"policy": policy.name, "stopped": policy.stopped} if several else {}),
        "stages": cfg.stages, "stage_evals": policy.stage_evals, "iterations": cfg.iterations,
        # (an rm-only run trains no policy: nothing evaluated)
        **{f"final_{k}": policy.stage_evals[-1][k] for k in EVAL_KEYS if policy.stage_evals},
        "datasets": {k: v.describe() for k, v in policy.inputs.stage_data.items()},
        "worker_restarts": shared["worker_restarts"],
        "reward_errors": policy.scorer.errors if policy.scorer else 0,
        "prompts_skipped_too_long": policy.inputs.prompts_skipped,
        "resumed_from": None if policy.resume_from is None else str(policy.resume_from),
        "reward_model": reward_model,
        "reward_model_eval": rm_eval,
        **{k: v for k, v in shared.items() if k != "worker_restarts"},
        **(summarize(rows) if rows else {}),
    }


def policies_summary(policies: list[PolicyState], shared: dict, iterations: int,
                     resumed_from: str | None) -> dict:
    """The run root's summary.json with several policies: each policy's headline figures
    (from its summary.json) and the run's shared ones."""
    keys = ("stopped", "final_eval_reward", "final_eval_greedy", "reward_first_iterations",
            "reward_last_iterations", "mean_step_seconds")
    return {
        "policies": {p.name: {k: p.run_dir.read_summary().get(k) for k in keys}
                     for p in policies},
        "iterations": iterations, "resumed_from": resumed_from, **shared,
    }


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


def write_comparison(run_dir: RunDir, summary: dict) -> str:
    """A run with several policies: the table comparing them (RUN/policies.md), printed."""
    def figure(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["| policy | held-out reward (sampled) | held-out greedy | train reward, first -> "
             "last iterations | s / iteration | stopped |", "|---|---|---|---|---|---|"]
    for name, p in summary["policies"].items():
        lines.append(
            f"| {name} | {figure(p['final_eval_reward'])} | {figure(p['final_eval_greedy'])} | "
            f"{figure(p['reward_first_iterations'])} -> {figure(p['reward_last_iterations'])} | "
            f"{figure(p['mean_step_seconds'])} | {p['stopped'] or ''} |")
    table = "\n".join(lines)
    text = (f"# {len(summary['policies'])} policies on one fleet: {run_dir}\n\n{table}\n\n"
            f"Wall time {summary['wall_seconds']:.0f} s, of which start-up "
            f"{summary['startup_seconds']:.0f} s; learner peak memory "
            f"{summary['learner_peak_mib']:.0f} MiB. Each policy's files: RUN/<policy>/.\n")
    run_dir.comparison.write_text(text)
    print(f"\nrun directory: {run_dir}\n{table}\n  wall time: {summary['wall_seconds']:.0f} s "
          f"(start-up {summary['startup_seconds']:.0f} s); comparison in {run_dir.comparison}")
    return text
