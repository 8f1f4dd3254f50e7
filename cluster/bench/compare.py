"""`lorafleet compare`: several algorithms on the same task, sample budget and seeds; one PNG
of reward against samples seen (mean and min-max over seeds) and a Markdown table."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from ...common.configio import ConfigError
from ...common.metrics import read_metrics
from ...common.run_dir import RunDir
from ..config import load_train_config
from ..trainer import Trainer

DEFAULT_CONFIGS = [f"deploy/configs/{name}.yaml" for name in ("default", "grpo", "rloo", "spr")]


def run_all(
    configs: list[str], seeds: list[int], overrides: list[str], out: Path
) -> dict[str, list[RunDir]]:
    """Runs every config with every seed; returns {algo: [run directory, ...]}."""
    runs: dict[str, list[RunDir]] = {}
    budgets = {}
    for path in configs:
        for seed in seeds:
            cfg = load_train_config(path, overrides + [f"seed={seed}"])
            budgets[path] = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
            print(f"\n== {cfg.algo.name} (seed {seed}) from {path}")
            with Trainer(replace(cfg, run_dir=str(out / f"{cfg.algo.name}-seed{seed}"))) as run:
                runs.setdefault(cfg.algo.name, []).append(run.run())
    if len(set(budgets.values())) > 1:
        raise ConfigError(f"configs draw different samples per iteration: {budgets}")
    return runs


def _mean_std(values: list[float | None]) -> str:
    if None in values:  # a figure some run has not (KL without a reference pass)
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def report(runs: dict[str, list[RunDir]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    lines = [
        "| algorithm | train reward, first 10 it. | train reward, last 10 it. | held-out sampled,"
        " end | held-out greedy, end | KL, last 10 it. | s / iteration |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for algo, dirs in runs.items():
        curves = [read_metrics(d) for d in dirs]
        summaries = [d.read_summary() for d in dirs]
        cfg = load_train_config(dirs[0].config)
        per_iter = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
        length = min(len(c) for c in curves)
        x = [(i + 1) * per_iter for i in range(length)]
        ys = [[c[i]["reward_mean"] for c in curves] for i in range(length)]
        ax.plot(x, [statistics.mean(y) for y in ys], label=algo)
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
        lines.append(
            f"| {algo} | "
            + " | ".join(_mean_std([s[key] for s in summaries]) for key in (
                "reward_first_iterations", "reward_last_iterations", "final_eval_reward",
                "final_eval_greedy", "kl_last_iterations", "mean_step_seconds",
            )) + " |"
        )
    seeds = len(next(iter(runs.values())))
    ax.set(xlabel="samples seen", ylabel="train reward (sampled)",
           title=f"reward vs samples, mean and min-max over {seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
    table = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(table)
    return table


def compare(configs: list[str] | None, seeds: list[int], overrides: list[str], out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = run_all(configs or DEFAULT_CONFIGS, seeds, overrides, out_dir)
    print("\n" + report(runs, out_dir))
    print(f"plot: {out_dir / 'compare.png'}  table: {out_dir / 'compare.md'}")
