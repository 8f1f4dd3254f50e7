"""The paper's result table in one command: zero-shot, k-shot, then each stage of the config's
chain (e.g. SFT, SFT+PPO), per task and official metric, as Markdown, JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig


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
    """Grouped bars: one group per task/metric (invalid-answer rates left out), one bar per
    setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metric_rows(results) if not k.endswith("/invalid_rate")]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(keys) * len(results) / 2), 3.5))
    for i, (setting, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(keys))]
        ys = [metrics.get(k, 0.0) for k in keys]
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


def stage_label(stages: list[str], index: int, algo: str) -> str:
    """"SFT", "SFT+PPO", ...: the chain up to and including stage `index`."""
    names = [algo.upper() if s == "rl" else s.upper() for s in stages[: index + 1]]
    return "+".join(names)


def nlu_table(cfg: TrainConfig, shots: int) -> Path:
    """Zero-/k-shot of the base model (`lorafleet eval`), then the config's stage chain with its
    held-out evaluation after each stage (`lorafleet train`)."""
    from .evaluate import evaluate_shots
    from .trainer import Trainer, fresh_run_dir

    out = fresh_run_dir(Path(cfg.run_dir))
    results = evaluate_shots(cfg, [0, shots] if shots else [0])
    cfg.run_dir = str(out / "train")
    run_dir = Trainer(cfg).run()
    summary = json.loads((run_dir / "summary.json").read_text())
    for index, row in enumerate(summary["stage_evals"][1:]):
        label = stage_label(cfg.stages, index, cfg.algo.name)
        results[label] = {k: v for k, v in row.items() if k != "stage"}
    write_table(out, "table", results)
    print(f"\n{markdown(results)}\nwrote {out}/table.md, table.json, table.png")
    return out
