"""`lorafleet compare`: several algorithms on the same task, sample budget and seeds; one PNG
of reward against samples seen (mean and min-max over seeds) and a Markdown table."""

from __future__ import annotations

import statistics
from pathlib import Path

from ...common.configio import ConfigError
from ...common.metrics import read_metrics
from ...common.run_dir import RunDir
from ..config import load_train_config
from .harness import markdown_table, publish, report, train_over_seeds

DEFAULT_CONFIGS = [f"deploy/configs/{name}.yaml" for name in ("default", "grpo", "rloo", "spr")]
FIGURES = [  # (summary key, column)
    ("reward_first_iterations", "train reward, first 10 it."),
    ("reward_last_iterations", "train reward, last 10 it."),
    ("final_eval_reward", "held-out sampled, end"), ("final_eval_greedy", "held-out greedy, end"),
    ("kl_last_iterations", "KL, last 10 it."), ("mean_step_seconds", "s / iteration"),
]


def run_all(
    configs: list[str], seeds: list[int], overrides: list[str], out: Path
) -> dict[str, list[RunDir]]:
    """Runs every config with every seed; returns {algo: [run directory, ...]}. The configs
    must draw the same samples per iteration (the x axis is samples seen)."""
    loaded = {path: load_train_config(path, overrides) for path in configs}
    budgets = {path: cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
               for path, cfg in loaded.items()}
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"configs draw different samples per iteration: {budgets}")
    runs: dict[str, list[RunDir]] = {}
    for path, cfg in loaded.items():
        runs.setdefault(cfg.algo.name, []).extend(train_over_seeds(path, seeds, overrides, out))
    return runs


def _mean_std(values: list[float | None]) -> str:
    if None in values:  # a figure some run has not (KL without a reference pass)
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def plot(runs: dict[str, list[RunDir]], path: Path) -> None:
    """Train reward against samples seen: each algorithm's mean and min-max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for algo, dirs in runs.items():
        curves = [read_metrics(d) for d in dirs]
        cfg = load_train_config(dirs[0].config)
        per_iter = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
        length = min(len(c) for c in curves)
        x = [(i + 1) * per_iter for i in range(length)]
        ys = [[c[i]["reward_mean"] for c in curves] for i in range(length)]
        ax.plot(x, [statistics.mean(y) for y in ys], label=algo)
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
    seeds = len(next(iter(runs.values())))
    ax.set(xlabel="samples seen", ylabel="train reward (sampled)",
           title=f"reward vs samples, mean and min-max over {seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_table(runs: dict[str, list[RunDir]]) -> str:
    """Each algorithm's figures, mean ± std over its seeds."""
    rows = []
    for algo, dirs in runs.items():
        summaries = [d.read_summary() for d in dirs]
        rows.append([algo, *(_mean_std([s[key] for s in summaries]) for key, _ in FIGURES)])
    return markdown_table(["algorithm", *(column for _, column in FIGURES)], rows)


def compare(configs: list[str] | None, seeds: list[int], overrides: list[str], out: str,
            command: str) -> None:
    out_dir = Path(out)
    runs = run_all(configs or DEFAULT_CONFIGS, seeds, overrides, out_dir)
    plot(runs, out_dir / "compare.png")
    publish(report(command, f"algorithms over seeds {seeds}", compare_table(runs)),
            out_dir / "compare.md")
    print(f"plot: {out_dir / 'compare.png'}")
