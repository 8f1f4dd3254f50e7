"""`lorafleet bench async`: the synchronous and the asynchronous loop on the same job, measured
in one command, and a setting where overlap pays.

Each setting runs the job (default: the default job, 12 iterations, no evaluation in between)
with rollout.mode=sync and rollout.mode=async (max_staleness 1) for every seed, and prints the
steady-state medians (the first WARMUP_ITERATIONS left out) of samples/s and of the seconds
per iteration the learner waited for rollouts and the workers waited for the learner, with the
async/sync ratios, then the train reward per sample of both modes.

Settings: "default" (every actor computes on the same 2 cores: overlap buys little) and
"slow reward" (reward.fns=[this module's exact_match_slow]: the task's exact match after a
sleep of SLOW_REWARD_SECONDS per sample, e.g. a judge behind an API: in async mode the sleep
overlaps the update).

Both modes run the same loop (cluster/trainer.py), so every row carries the figures:
`samples_per_s`, `learner_wait_seconds` (the iteration less the learner's own update) and
`workers_wait_seconds` (how long the workers sat idle)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ...common.metrics import read_metrics
from ...reward.rules import exact_match
from ..config import load_train_config
from .harness import markdown_table, publish, ratio, report, train

ITERATIONS = 12  # unless the overrides say otherwise
WARMUP_ITERATIONS = 2
SLOW_REWARD_SECONDS = 0.01
SLOW_REWARD = f"{__name__}:exact_match_slow"
SETTINGS = {"default": [], "slow reward": [f"reward.fns=[{SLOW_REWARD}]"]}
WINDOW = 3  # iterations averaged for the first / last train reward
FIGURES = ("samples_per_s", "learner_wait_s", "workers_wait_s")  # loop_figures' keys


def exact_match_slow(completions, reference, **kwargs) -> list[float]:
    """The addition task's exact match, SLOW_REWARD_SECONDS per sample later."""
    time.sleep(SLOW_REWARD_SECONDS * len(completions))
    return exact_match(completions=completions, reference=reference, **kwargs)


def loop_figures(rows: list[dict]) -> dict[str, float]:
    """Medians over the steady iterations: samples/s and the two waits (s per iteration)."""
    steady = rows[WARMUP_ITERATIONS:]
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "learner_wait_s": statistics.median(r["learner_wait_seconds"] for r in steady),
        "workers_wait_s": statistics.median(r["workers_wait_seconds"] for r in steady),
    }


def reward_per_sample(rows: list[dict]) -> tuple[float, float]:
    """Mean train reward of the first and the last WINDOW iterations."""
    first, last = rows[:WINDOW], rows[-WINDOW:]
    return (statistics.mean(r["reward_mean"] for r in first),
            statistics.mean(r["reward_mean"] for r in last))


def mode_cells(figures: dict[str, dict[str, float]], mode: str, rows: list[dict]) -> list[str]:
    """A run's figures (`figures[mode]`), async's each with its ratio to sync's (the baseline:
    the same setting and seed), and its train reward first -> last."""
    f = figures[mode]
    cells = [f"{f['samples_per_s']:.1f}", f"{f['learner_wait_s']:.2f}",
             f"{f['workers_wait_s']:.2f}"]
    if mode == "async":
        cells = [f"{cell} ({ratio(f[k], figures['sync'][k])})"
                 for cell, k in zip(cells, FIGURES, strict=True)]
    first, last = reward_per_sample(rows)
    return [*cells, f"{first:.3f} -> {last:.3f}"]


def bench_async(path: str | None, overrides: list[str], seeds: list[int], command: str) -> None:
    base = [f"iterations={ITERATIONS}", "eval_every=0", "checkpoint_every=0", *overrides]
    iterations = load_train_config(path, base).iterations
    curves = []  # (label, train reward per iteration)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-async-") as tmp:
        for setting, setting_overrides in SETTINGS.items():
            # the slow reward shows the overlap; one seed says it as well as several
            for seed in seeds if setting == "default" else seeds[:1]:
                figures = {}
                for mode in ("sync", "async"):
                    cfg = load_train_config(path, [*base, *setting_overrides, f"seed={seed}",
                                                   f"rollout.mode={mode}"])
                    run_dir = Path(tmp) / f"{setting.replace(' ', '_')}-{seed}-{mode}"
                    metrics = read_metrics(train(cfg, run_dir))
                    figures[mode] = loop_figures(metrics)
                    curves.append((f"{setting}, seed {seed}, {mode}",
                                   [r["reward_mean"] for r in metrics]))
                    rows.append([setting, str(seed), mode, *mode_cells(figures, mode, metrics)])
    table = markdown_table(["setting", "seed", "mode", "samples/s", "learner waits (s/iter)",
                            "workers wait (s/iter)", "train reward, first -> last 3 iter."], rows)
    publish(report(command, f"async vs sync, {iterations} iterations (medians of iterations "
                   f"{WARMUP_ITERATIONS}-{iterations - 1}; ratios async / sync in the same "
                   f"setting and seed; slow reward: {SLOW_REWARD_SECONDS * 1000:g} ms per "
                   "sample)", table))
    print("\ntrain reward per sample, by iteration:")
    for label, curve in curves:
        print(f"  {label:>28s}: " + " ".join(f"{v:.2f}" for v in curve))
