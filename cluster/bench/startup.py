"""`lorafleet bench startup`: where a job's start-up goes, the first time and the next.

Runs `lorafleet train CONFIG` (the default job) for one iteration, as a user does, twice: the
first run with an empty cache directory (LORAFLEET_CACHE: no model built, no vLLM compile
cache) and, where this user may, the OS page cache dropped, as on the first run after an
install; the second right after, as every later run. Each run's start-up is read from its
summary.json, phase by phase, with the slowest actor's own phases. The baseline, measured in
the same command with the second run's cache: a bare vLLM engine built from the run's own
engine arguments in a fresh process (the interpreter, `from vllm import LLM`, the engine),
the least any job with a vLLM engine pays."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...common.run_dir import RunDir
from ...common.specs import EngineSpec
from ...common.startup import phases_text
from .harness import markdown_table, publish, ratio, report

# the targets of a start-up, first run after install and later runs (AVX-512 machine)
TARGETS = {"first": 30.0, "second": 15.0}

BARE_ENGINE = """
import pickle, sys, time
import psutil
started = psutil.Process().create_time()
from lorafleet.rollout.worker import configure_vllm_env, engine_args
spec = pickle.loads(bytes.fromhex(sys.argv[1]))
configure_vllm_env(spec.kv_cache_gib, spec.threads_per_worker)
from vllm import LLM
LLM(**engine_args(spec, "float32", gpu=False))
print("SECONDS", time.time() - started)
"""


def drop_page_cache() -> bool:
    """Empties the OS page cache (root only on Linux); whether it could."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def train_once(config: str | None, overrides: list[str], run_dir: Path, cache: Path) -> dict:
    """One `lorafleet train` process of one iteration; its summary.json."""
    command = [sys.executable, "-m", "lorafleet.cluster.cli", "train",
               *([config] if config else []), *overrides, f"run_dir={run_dir}",
               "iterations=1", "checkpoint_every=0"]
    env = {**os.environ, "LORAFLEET_CACHE": str(cache)}
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    summary = RunDir(run_dir).read_summary()
    summary["command_seconds"] = time.time() - started
    return summary


def bare_engine_seconds(spec: EngineSpec, cache: Path) -> float:
    """A fresh process from its start to a vLLM engine of `spec` being up (on CPU)."""
    done = subprocess.run([sys.executable, "-c", BARE_ENGINE, pickle.dumps(spec).hex()],
                          env={**os.environ, "LORAFLEET_CACHE": str(cache)},
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the bare vLLM engine failed:\n{done.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def slowest_actor(summary: dict) -> tuple[str, dict[str, float]]:
    name = max(summary["actor_startup"], key=lambda a: sum(summary["actor_startup"][a].values()))
    return name, summary["actor_startup"][name]


def bench_startup(config: str | None, overrides: list[str], out: str, command: str) -> None:
    from ..config import load_train_config
    from ..specs import engine_spec

    cfg = load_train_config(config, overrides)  # a bad config fails here, before any run
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lorafleet-cold-cache-", dir=out_dir) as cache:
        dropped = drop_page_cache()
        print(f"first run: empty cache {cache}; page cache "
              f"{'dropped' if dropped else 'not dropped (needs root)'}", flush=True)
        runs["first"] = train_once(config, overrides, out_dir / "first", Path(cache))
        print("second run, same cache", flush=True)
        runs["second"] = train_once(config, overrides, out_dir / "second", Path(cache))
        bare = bare_engine_seconds(engine_spec(cfg, runs["second"]["model_path"]), Path(cache))
    rows, details = [], []
    for name, summary in runs.items():
        seconds = summary["startup_seconds"] + summary["startup_phases"].get(
            "python and imports", 0.0)
        met = "met" if seconds <= TARGETS[name] else "missed"
        rows.append([f"{name} run", f"{seconds:.1f}", f"{TARGETS[name]:.0f} ({met})",
                     ratio(seconds, bare), f"{summary['command_seconds']:.1f}"])
        actor, phases = slowest_actor(summary)
        details.append(f"- {name} run: {phases_text(summary['startup_phases'])}; slowest "
                       f"actor {actor}: {phases_text(phases)}")
    rows.append(["bare vLLM engine (baseline)", f"{bare:.1f}", "—", "1.00x", "—"])
    table = markdown_table(
        ["start-up of", "seconds (process start to first verified sync)", "target",
         "vs bare engine", "whole command, 1 iteration (s)"], rows)
    text = report(command, "Start-up, first run after install and the next", table +
                  "\n" + "\n".join(details) + ("" if dropped else
                  "\n\nThe page cache was not dropped (not root): the first run read "
                  "warm files.") + "\n")
    (out_dir / "startup.json").write_text(json.dumps(
        {**runs, "bare_engine_seconds": bare, "page_cache_dropped": dropped}, indent=2))
    publish(text, out_dir / "startup.md", ("startup.json",))
