"""What every experiment shares: runs of a config through the Trainer, Markdown tables (with
ratios against a baseline measured in the same command), each printed and written under a line
naming the command, the commit and the CPU it came from; and the result tables of settings
(zero-shot, k-shot, each stage of a chain, each variant) against each task's metrics, as
Markdown, JSON and a bar chart (`eval`, `nlu-table`, `meet-table`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import replace
from pathlib import Path

from ...common.run_dir import RunDir
from ..config import TrainConfig, load_train_config
from ..trainer import Trainer

COST_PREFIX = "cost/"  # rows of a table in seconds, MiB, steps: not plotted with the scores


# -- where a figure comes from -----------------------------------------------------------------
def commit() -> str:
    """This checkout's short commit; "unknown" outside a git checkout (e.g. a wheel install)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str) -> str:
    return f"`{command}` at commit {commit()} on {cpu_name()} ({os.cpu_count()} cores)"


def report(command: str, title: str, table: str) -> str:
    """A table under its title and the line naming where it came from."""
    return f"{title}\n{provenance(command)}\n\n{table}"


def publish(text: str, path: Path | None = None, beside: tuple[str, ...] = ()) -> None:
    """Prints a report, and writes it to `path` (next to the runs it came from); `beside`:
    the names of files written next to it, for the reader."""
    print("\n" + text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {', '.join([str(path), *beside])}")


# -- runs ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run_dir: Path) -> RunDir:
    """One training job of `cfg` into `run_dir`, through the Trainer."""
    with Trainer(replace(cfg, run_dir=str(run_dir))) as trainer:
        return trainer.run()


def train_over_seeds(path: str, seeds: list[int], overrides: list[str], out: Path
                     ) -> list[RunDir]:
    """The config at `path` with each seed, into out/{algorithm}-seed{seed}."""
    runs = []
    for seed in seeds:
        cfg = load_train_config(path, [*overrides, f"seed={seed}"])
        print(f"\n== {cfg.algo.name} (seed {seed}) from {path}")
        runs.append(train(cfg, out / f"{cfg.algo.name}-seed{seed}"))
    return runs


# -- tables -------------------------------------------------------------------------------------
def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " --- |" * (len(header) - 1)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def metric_rows(results: dict[str, dict[str, float]]) -> list[str]:
    """The `task/metric` keys of any setting, in first-seen order."""
    return list(dict.fromkeys(k for metrics in results.values() for k in metrics if "/" in k))


def results_markdown(results: dict[str, dict[str, float]]) -> str:
    """One column per setting, one row per `task/metric` ("—": a setting without it)."""
    settings = list(results)
    return markdown_table(["task / metric", *settings], [
        [key, *(f"{results[s][key]:.3f}" if key in results[s] else "—" for s in settings)]
        for key in metric_rows(results)
    ])


def plot_results(results: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: one group per task/metric (invalid-answer rates and costs left out), one
    bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metric_rows(results)
            if not k.endswith("/invalid_rate") and not k.startswith(COST_PREFIX)]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.8 * len(keys) * len(results))), 3.5))
    for i, (setting, metrics) in enumerate(results.items()):
        present = [j for j, k in enumerate(keys) if k in metrics]  # no bar for "—"
        xs = [j + i * width for j in present]
        ys = [metrics[keys[j]] for j in present]
        bars = ax.bar(xs, ys, width, label=setting)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylabel("held-out score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, name: str, results: dict[str, dict[str, float]], command: str,
                  title: str, plot_png: bool = True) -> None:
    """Writes out/{name}.json (and {name}.png), then prints and writes the table as
    out/{name}.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    if plot_png:
        plot_results(results, out / f"{name}.png")
    publish(report(command, title, results_markdown(results)), out / f"{name}.md",
            (f"{name}.json", *([f"{name}.png"] if plot_png else [])))
