"""`lorafleet bench demo`: the default job (or any config) over several seeds, with the start and
end figures, their spread, and the CPU they ran on: where the README's figures come from.

The start figures come from the shipped model and must be the same on every machine; the end
figures vary with the seed and with the CPU's float kernels (run it with other thread counts,
`learner.threads=1`, or `ATEN_CPU_CAPABILITY=avx2` to see a perturbed float path).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .harness import markdown_table, publish, report, train_over_seeds

# summary keys shown after the held-out evaluations of every stage ({w}: summary's window)
RUN_FIGURES = [
    ("reward_first_iterations", "train reward, first {w} iterations"),
    ("reward_last_iterations", "train reward, last {w} iterations"),
    ("kl_last_iterations", "KL per token, last {w} iterations"),
    ("wall_seconds", "wall time (s)"),
]
HELD_OUT = [("eval_reward", "held-out reward, sampled"), ("eval_greedy", "held-out greedy")]


def figure_rows(summary: dict) -> list[tuple[str, float]]:
    """(label, value): the held-out evaluation before the first stage and after each, then the
    RL stage's train reward, KL and the wall time."""
    rows = [(f"{label}, {'start' if e['stage'] == 'start' else 'after ' + e['stage']}", e[key])
            for e in summary["stage_evals"] for key, label in HELD_OUT]
    return rows + [(label.format(w=summary.get("window")), summary[key])
                   for key, label in RUN_FIGURES if summary.get(key) is not None]


def demo_table(summaries: list[dict], seeds: list[int]) -> str:
    """Each figure per seed with its mean ± std and min; then the held-out change from the
    start (the start is the baseline, measured in the same run)."""
    rows = []
    per_seed = [figure_rows(s) for s in summaries]
    for i, (label, _) in enumerate(per_seed[0]):
        values = [figures[i][1] for figures in per_seed]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append([label, *(f"{v:.3f}" for v in values),
                     f"{statistics.mean(values):.3f} ± {std:.3f}", f"{min(values):.3f}"])
    first, last = (lambda s: s["stage_evals"][0]), (lambda s: s["stage_evals"][-1])
    gains = [last(s)["eval_greedy"] - first(s)["eval_greedy"] for s in summaries]
    # a ratio of rewards that start near 0 or below (VADER's compound) says nothing
    if all(first(s)["eval_reward"] > 0.01 for s in summaries):
        ratios = [last(s)["eval_reward"] / first(s)["eval_reward"] for s in summaries]
        rows.append(["held-out sampled, end / start", *(f"{r:.2f}x" for r in ratios), "",
                     f"{min(ratios):.2f}x"])
    rows.append(["held-out greedy, end - start", *(f"{g:+.3f}" for g in gains), "",
                 f"{min(gains):+.3f}"])
    return markdown_table(["figure", *(f"seed {s}" for s in seeds), "mean ± std", "min"], rows)


def bench_demo(config: str | None, seeds: list[int], overrides: list[str], out: str,
               command: str) -> None:
    out_dir = Path(out)
    runs = train_over_seeds(config or "deploy/configs/default.yaml", seeds, overrides, out_dir)
    table = demo_table([run.read_summary() for run in runs], seeds)
    publish(report(command, f"bench demo over seeds {seeds}", table), out_dir / "demo.md")
