"""`lorafleet bench demo`: the default job (or any config) over several seeds, with the start and
end figures, their spread, and the CPU they ran on: where the README's figures come from.

The start figures come from the shipped model and must be the same on every machine; the end
figures vary with the seed and with the CPU's float kernels (run it with other thread counts,
`learner.threads=1`, or `ATEN_CPU_CAPABILITY=avx2` to see a perturbed float path).
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

from .compare import run_all

# (summary key or start-eval key, label); "start" figures are the stage evaluation before RL.
FIGURES = [
    ("start:eval_reward", "held-out reward, sampled, start"),
    ("final_eval_reward", "held-out reward, sampled, end"),
    ("start:eval_greedy", "held-out accuracy, greedy, start"),
    ("final_eval_greedy", "held-out accuracy, greedy, end"),
    ("reward_first_iterations", "train reward, first 10 iterations"),
    ("reward_last_iterations", "train reward, last 10 iterations"),
    ("kl_last_iterations", "KL per token, last 10 iterations"),
    ("wall_seconds", "wall time (s)"),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def figure(summary: dict, key: str) -> float:
    if key.startswith("start:"):
        return summary["stage_evals"][0][key.split(":", 1)[1]]
    return summary[key]


def demo_table(summaries: list[dict], seeds: list[int]) -> str:
    lines = [
        "| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | min |",
        "| --- |" + " --- |" * (len(seeds) + 2),
    ]
    for key, label in FIGURES:
        values = [figure(s, key) for s in summaries]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {statistics.mean(values):.3f} ± {std:.3f} | {min(values):.3f} |")
    gains = [(figure(s, "final_eval_reward") / max(figure(s, "start:eval_reward"), 1e-9),
              figure(s, "final_eval_greedy") - figure(s, "start:eval_greedy")) for s in summaries]
    lines.append("| held-out sampled, end / start | " + " | ".join(f"{g[0]:.2f}x" for g in gains)
                 + f" | | {min(g[0] for g in gains):.2f}x |")
    lines.append("| held-out greedy, end - start | " + " | ".join(f"{g[1]:+.3f}" for g in gains)
                 + f" | | {min(g[1] for g in gains):+.3f} |")
    return "\n".join(lines) + "\n"


def bench_demo(config: str | None, seeds: list[int], overrides: list[str], out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = run_all([config or "deploy/configs/default.yaml"], seeds, overrides, out_dir)
    dirs = next(iter(runs.values()))
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    table = (f"CPU: {cpu_name()}; overrides: {' '.join(overrides) or 'none'}\n\n"
             + demo_table(summaries, seeds))
    (out_dir / "demo.md").write_text(table)
    print("\n" + table + f"\ntable: {out_dir / 'demo.md'}")
