"""`lorafleet bench shape`: a job on a real model's shape next to the same job on the embedded
tiny model (the baseline), in one command, through the real fleet (vLLM rollout workers with
the in-memory LoRA hot swap and its probe check, the PEFT learner, the reward actors).

The shaped model is Qwen2.5's published config (cluster/bench/memory.py QWEN2_SHAPES:
vocabulary 151936, tied embeddings, rope theta 1e6) built random-init from `Qwen2Config` (no
download), its max positions the job's model.max_model_len, with the embedded model's
tokenizer (its few hundred ids are a corner of the 151936: a random-init model samples any id,
which decodes to nothing; the probe and the update work on ids). Both runs start from a model
directory (the tiny one's by its path), so the short held-out split the job sets up
(task.eval_fraction) does not rebuild the tiny model.

Per run: the adapter's bytes as published (the snapshot's tensors); sync seconds, the metrics
rows' (publish -> every worker swapped) and whole syncs timed after the run (publish -> every
worker swapped and probed -> the learner's check passed); the learner's update seconds
(medians over the iterations after the first); the largest probe log-prob gap against its
tolerance (the run itself stops on a gap over it); every actor's peak RSS (its process's
ru_maxrss: the learner's model and optimiser, each worker's vLLM engine and KV cache, each
reward actor)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ...common.devices import peak_rss_mib
from ...common.metrics import read_metrics
from ..config import TrainConfig, load_train_config
from ..specs import rollout_workers, sync_tolerance
from ..trainer import Trainer
from .harness import markdown_table, publish, ratio, report
from .memory import QWEN2_SHAPES, qwen2_config

# A few iterations of small batches; a held-out split of 10 prompts (the start and final
# evaluations generate on it); no checkpoints.
SHAPE_RUN = ["iterations=4", "prompts_per_iteration=8", "eval_every=0", "checkpoint_every=0",
             "task.eval_fraction=0.004"]
SHAPES = list(QWEN2_SHAPES)
MIB = 2**20
VERIFIED_SYNCS = 3  # timed after the run, the probe check included (the rows' sync stops short)


def tiny_model_dir() -> Path:
    """The embedded default model (the addition task's)."""
    from ...common.tasks.addition import AdditionTask
    from ...common.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(AdditionTask(), TinyModelSpec())


def shaped_model(name: str, max_positions: int, tokenizer_dir: Path, root: Path) -> Path:
    """Qwen2.5 `name`'s shapes, random-init, with the tokenizer of `tokenizer_dir` and its
    special ids; built once under root/models (bfloat16 on disk: half the bytes; loaded in
    the job's dtype)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    path = root / "models" / f"shape-{name}-pos{max_positions}"
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = qwen2_config(name, max_position_embeddings=max_positions,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".staging-"))
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def parameter_count(model_dir: Path) -> int:
    """The base model's parameters, from its safetensors headers (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def run_figures(cfg: TrainConfig, run_dir: Path) -> dict:
    """Runs `cfg` into `run_dir` and measures it before the fleet stops."""
    import ray

    with Trainer(replace(cfg, run_dir=str(run_dir))) as trainer:
        trainer.run()
        fleet = trainer.fleet
        snapshot = ray.get(fleet.learner.publish.remote())
        verified = []  # whole syncs: publish, swap, probe, the learner's check of the probes
        for _ in range(VERIFIED_SYNCS):
            start = time.perf_counter()
            fleet.finish_sync(fleet.start_sync())
            verified.append(time.perf_counter() - start)
        peaks = {f"{group.spec.role} {i}": ray.get(actor.__ray_call__.remote(
                     lambda _: peak_rss_mib()))
                 for group in fleet.groups for i, actor in enumerate(group.actors)}
        summary = trainer.run_dir.read_summary()
    rows = read_metrics(trainer.run_dir)
    steady = rows[1:] or rows
    return {
        "parameters": parameter_count(Path(cfg.model.name_or_path)),
        "adapter_bytes": sum(t.numel() * t.element_size() for t in snapshot.tensors.values()),
        "iterations": len(rows),
        "sync_seconds": statistics.median(r["sync_seconds"] for r in steady),
        "verified_sync_seconds": statistics.median(verified),
        "update_seconds": statistics.median(r["train_seconds"] for r in steady),
        "iteration_seconds": statistics.median(r["step_seconds"] for r in steady),
        "probe_gap": max(r["probe_max_logprob_gap"] for r in rows),
        "probe_tolerance": sync_tolerance(cfg),
        "startup_seconds": summary["startup_seconds"],
        "peak_rss_mib": peaks,
    }


def figure_rows(base: dict, shaped: dict) -> list[list[str]]:
    """One row per figure: the tiny model's, the shaped model's, and their ratio."""
    def row(label: str, a: float, b: float, fmt: str) -> list[str]:
        return [label, format(a, fmt), format(b, fmt), ratio(b, a)]

    rows = [
        row("base parameters (M)", base["parameters"] / 1e6, shaped["parameters"] / 1e6, ".2f"),
        row("adapter published (MiB)", base["adapter_bytes"] / MIB,
            shaped["adapter_bytes"] / MIB, ".3f"),
        row("sync: publish -> every worker swapped (s)", base["sync_seconds"],
            shaped["sync_seconds"], ".3f"),
        row("sync: publish -> every worker verified (s)", base["verified_sync_seconds"],
            shaped["verified_sync_seconds"], ".3f"),
        row("learner update (s)", base["update_seconds"], shaped["update_seconds"], ".2f"),
        row("iteration (s)", base["iteration_seconds"], shaped["iteration_seconds"], ".2f"),
        row("start-up: actors, first sync (s)", base["startup_seconds"],
            shaped["startup_seconds"], ".1f"),
        row("probe: largest log-prob gap", base["probe_gap"], shaped["probe_gap"], ".2e"),
    ]
    for actor, mib in base["peak_rss_mib"].items():
        rows.append(row(f"peak RSS, {actor} (MiB)", mib, shaped["peak_rss_mib"][actor], ".0f"))
    return rows


def bench_shape(path: str | None, overrides: list[str], shape: str, out: str,
                command: str) -> dict[str, dict]:
    """The job (SHAPE_RUN, then `overrides`) on the tiny model and on `shape`; prints the
    table, writes it and the figures (JSON) to `out`; returns the figures by model."""
    from ...common.cache import cache_root

    tiny = tiny_model_dir()
    cfg = load_train_config(path, [*SHAPE_RUN, *overrides, f"model.name_or_path={tiny}"])
    shaped = shaped_model(shape, cfg.model.max_model_len, tiny, cache_root())
    figures = {}
    for name, model in (("tiny", tiny), (shape, shaped)):
        print(f"\n== {name}: {model}", flush=True)
        run_cfg = replace(cfg, model=replace(cfg.model, name_or_path=str(model)))
        figures[name] = run_figures(run_cfg, Path(out) / name)
    out_dir = Path(out)
    (out_dir / "shape.json").write_text(json.dumps(figures, indent=2))
    table = markdown_table(["figure", "tiny (baseline)", shape, "ratio"],
                           figure_rows(figures["tiny"], figures[shape]))
    tolerance = figures[shape]["probe_tolerance"]
    publish(report(command, f"a real model's shape ({shape}, random-init) vs the embedded tiny "
                   f"model: {cfg.iterations} iterations of {cfg.prompts_per_iteration} prompts x "
                   f"{cfg.rollout.samples_per_prompt} samples, {rollout_workers(cfg)} rollout "
                   f"workers, {cfg.reward.num_actors} reward actors; medians after the first "
                   f"iteration; probe tolerance {tolerance:g}", table),
            out_dir / "shape.md", ("shape.json",))
    return figures
