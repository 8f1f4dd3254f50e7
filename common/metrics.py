"""The run directory's metrics: one JSON object per iteration, and the reward curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .records import Rollout
from .run_dir import RunDir


class MetricsSink:
    """Appends rows to the run's metrics.jsonl; `lines` counts the rows in the file (a resumed
    run continues after the rows its checkpoint kept)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.path = run_dir.metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = len(self.path.read_text().splitlines()) if self.path.exists() else 0

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.lines += 1


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def response_lengths(rollouts: list[Rollout]) -> dict[str, float]:
    """Per-iteration length statistics: tokens in all, mean and longest response, and the share
    cut off at rollout.max_new_tokens (finish reason "length"; a stop string or EOS is "stop")."""
    lengths = [len(r.response_ids) for r in rollouts]
    return {
        "response_tokens": sum(lengths),
        "response_length_mean": sum(lengths) / len(lengths),
        "response_length_max": max(lengths),
        "truncated_fraction": sum(r.finish_reason == "length" for r in rollouts) / len(lengths),
    }


def read_metrics(run_dir: RunDir, stage: str = "rl") -> list[dict]:
    """The rows one stage logged (RL iterations by default; rows predating stages count as rl)."""
    path = run_dir.metrics
    if not path.exists():
        return []
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("stage", "rl") == stage]


def summarize(rows: list[dict], window: int = 10) -> dict[str, float]:
    """Headline figures of a run: reward of the first vs last `window` iterations, held-out
    reward at the start, timing."""
    window = max(1, min(window, len(rows) // 2))

    def mean(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    return {
        "reward_first_iterations": mean("reward_mean", rows[:window]),
        "reward_last_iterations": mean("reward_mean", rows[-window:]),
        "window": window,
        "initial_eval_reward": rows[0].get("eval_reward"),
        "initial_eval_greedy": rows[0].get("eval_greedy"),
        # no reference pass (kl_coef 0): no KL
        "kl_last_iterations": None if rows[-1]["kl"] is None else mean("kl", rows[-window:]),
        "mean_step_seconds": mean("step_seconds", rows[1:] or rows),
        "mean_rollout_tokens_per_s": mean("rollout_tokens_per_s", rows[1:] or rows),
        "mean_sync_seconds": mean("sync_seconds", rows[1:] or rows),
    }


def plot_reward_curve(run_dir: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    it = [r["iteration"] for r in rows]
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_r.plot(it, [r["reward_mean"] for r in rows], label="train reward (sampled)")
    final = run_dir.read_summary() if run_dir.summary.exists() else None
    for key, label in (("eval_reward", "held-out (sampled)"), ("eval_greedy", "held-out (greedy)")):
        points = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        if final is not None:  # the final adapter, evaluated after the last update
            points.append((final["iterations"], final[f"final_{key}"]))
        if points:
            ax_r.plot(*zip(*points, strict=True), "o-", label=label)
    ax_r.set(xlabel="iteration", ylabel="reward", title="reward")
    ax_r.legend()
    ax_kl.plot(it, [r["kl"] if r["kl"] is not None else math.nan for r in rows], color="C3")
    ax_kl.set(xlabel="iteration", ylabel="KL(policy || reference)", title="KL")
    fig.tight_layout()
    out = run_dir.reward_curve
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
