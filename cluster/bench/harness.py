"""Result tables: settings (zero-shot, k-shot, each stage of a chain) against each task's
official metrics, written as Markdown, JSON and a bar chart (`lorafleet eval`, `nlu-table`,
`meet-table`)."""

from __future__ import annotations

import json
from pathlib import Path

COST_PREFIX = "cost/"  # rows of a table in seconds, MiB, steps: not plotted with the scores


def metric_rows(results: dict[str, dict[str, float]]) -> list[str]:
    """The `task/metric` keys of any setting, in first-seen order."""
    return list(dict.fromkeys(k for metrics in results.values() for k in metrics if "/" in k))


def markdown(results: dict[str, dict[str, float]]) -> str:
    settings = list(results)
    lines = ["| task / metric | " + " | ".join(settings) + " |",
             "| --- |" + " --- |" * len(settings)]
    for key in metric_rows(results):
        cells = [f"{results[s][key]:.3f}" if key in results[s] else "—" for s in settings]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
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


def write_table(run_dir: Path, name: str, results: dict[str, dict[str, float]],
                plot_png: bool = True) -> None:
    """run_dir/{name}.md, {name}.json (and {name}.png)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{name}.md").write_text(markdown(results))
    (run_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    if plot_png:
        plot(results, run_dir / f"{name}.png")
