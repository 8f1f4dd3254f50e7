"""MEET against its baselines in one command, same data, same budget: each variant is a run of
the config with its stages changed, on the meet stage's data and epochs; a Markdown, JSON and
PNG table of the held-out VADER (or the task's reward) means, each level's for the controlled
variants, wall time and the learner's peak memory.

Budget: every variant trains stage1_epochs + stage2_epochs passes over its own data (SFT: the
best level's rows; DPO: best-vs-worst pairs of one prompt); MEET-DPO adds the dpo section's
epochs on top of MEET (it is DPO on top of the control adapters)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from ...common.corpora import DatasetConfig, read_rows, write_jsonl
from ...common.metrics import read_metrics
from ...common.run_dir import RunDir, fresh_directory
from ...common.tasks.registry import build_task
from ..config import TrainConfig
from ..fleet import connect_ray
from ..inputs import driver_tokenizer, load_meet_data, resolve_model
from .harness import train, write_results

# the variants a MEET variant's margin is taken over (`--seeds`)
BASELINES = ("SFT (best level)", "Chain of Hindsight", "DPO")
# Chain of Hindsight's hand-written control texts, worst level first
CONTROL_TEXTS = {2: ["a bad sentence:", "a good sentence:"],
                 3: ["a bad sentence:", "an okay sentence:", "a good sentence:"]}


def baseline_data(cfg: TrainConfig, out: Path) -> tuple[Path, Path, int]:
    """The meet data's best-level rows (SFT) and best-vs-worst pairs of one prompt (DPO, one
    per best row, the worst drawn with the run's seed) as JSONL; returns them and K."""
    task = build_task(cfg.task)
    tokenizer = driver_tokenizer(cfg, resolve_model(cfg, task))
    items = load_meet_data(cfg, task, tokenizer).items
    raw = read_rows(cfg.meet.data, task, "scored")
    levels = 1 + max(e.level for e in items)
    best = levels - 1 if cfg.meet.best_level is None else cfg.meet.best_level
    data = cfg.meet.data
    prompt, response = data.prompt_column, data.response_column
    best_rows = [raw[e.index] for e in items if e.level == best]
    worst: dict[str, list[str]] = {}
    for e in items:
        if e.level == 0:
            worst.setdefault(raw[e.index][prompt], []).append(raw[e.index][response])
    rng = random.Random(cfg.seed)
    pairs = [{"prompt": r[prompt], "chosen": r[response],
              "rejected": rng.choice(worst[r[prompt]])}
             for r in best_rows if r[prompt] in worst]
    sft = write_jsonl([{"prompt": r[prompt], "response": r[response]} for r in best_rows],
                      out / "data" / "sft_best_level.jsonl")
    return sft, write_jsonl(pairs, out / "data" / "dpo_best_vs_worst.jsonl"), levels


def variants(cfg: TrainConfig, sft: Path, pairs: Path, levels: int) -> dict[str, TrainConfig]:
    meet = cfg.meet
    epochs = meet.stage1_epochs + meet.stage2_epochs
    batch = meet.batch_size
    if levels not in CONTROL_TEXTS:
        raise ValueError(f"meet-table has Chain of Hindsight texts for 2 or 3 levels, the data "
                         f"has {levels}")
    dpo = replace(cfg.dpo, data=DatasetConfig(path=str(pairs)), batch_size=batch)
    return {
        "SFT (best level)": replace(cfg, stages=["sft"], sft=replace(
            cfg.sft, data=DatasetConfig(path=str(sft)), epochs=epochs, batch_size=batch,
            lr=meet.stage2_lr)),
        "Chain of Hindsight": replace(cfg, stages=["meet"], meet=replace(
            meet, control="text", rank=None, control_texts=CONTROL_TEXTS[levels],
            stage1_epochs=0, stage2_epochs=epochs)),
        "DPO": replace(cfg, stages=["dpo"], dpo=replace(dpo, epochs=epochs)),
        "MEET-LoRA": replace(cfg, stages=["meet"]),
        "MEET soft prompt": replace(cfg, stages=["meet"], meet=replace(
            meet, control="prompt", rank=None)),
        "MEET stage 1 only": replace(cfg, stages=["meet"], meet=replace(
            meet, stage1_epochs=epochs, stage2_epochs=0)),
        "MEET stage 2 only": replace(cfg, stages=["meet"], meet=replace(
            meet, stage1_epochs=0, stage2_epochs=epochs)),
        "MEET-DPO": replace(cfg, stages=["meet", "dpo"], dpo=dpo),
    }


def table_row(run_dir: RunDir) -> dict[str, float]:
    """The last stage's held-out means (the best level's, for a controlled variant), each
    level's where the variant has them, the training steps, wall time and peak memory."""
    summary = run_dir.read_summary()
    steps = sum(len(read_metrics(run_dir, stage)) for stage in ("sft", "dpo", "meet"))
    last = summary["stage_evals"][-1]
    meet = next((row for row in summary["stage_evals"] if row["stage"] == "meet"), {})
    return {
        "reward/sampled": last["eval_reward"], "reward/greedy": last["eval_greedy"],
        **{k.replace("meet/", "reward/"): v for k, v in meet.items() if k.startswith("meet/")},
        "cost/train_steps": steps, "cost/wall_s": summary["wall_seconds"],
        "cost/learner_peak_mib": summary["learner_peak_mib"],
    }


def variant_results(cfg: TrainConfig, out: Path, command: str) -> dict[str, dict[str, float]]:
    """Every variant run under `out` (on the connected Ray cluster); writes out/table.*."""
    sft, pairs, levels = baseline_data(cfg, out)
    results = {}
    for name, variant in variants(cfg, sft, pairs, levels).items():
        print(f"\n== seed {cfg.seed}, {name}: stages {variant.stages}", flush=True)
        run_dir = out / name.lower().replace(" ", "_").replace("(", "").replace(")", "")
        results[name] = table_row(train(variant, run_dir))
    write_results(out, "table", results, command, f"MEET and its baselines, seed {cfg.seed}")
    return results


def over_seeds(per_seed: dict[int, dict[str, dict[str, float]]]
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """One table of each variant's best-level means per seed and their mean (costs: the
    mean), and each MEET variant's margin over each baseline: its min and max over seeds."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    table = {}
    for name in first:
        row = {}
        for key in first[name]:
            values = [per_seed[s][name][key] for s in seeds]
            if key in ("reward/sampled", "reward/greedy"):
                row |= {f"{key} seed {s}": v for s, v in zip(seeds, values, strict=True)}
            row[f"{key} mean"] = sum(values) / len(values)
        table[name] = row
    margins = {}
    for name in first:
        if name in BASELINES:
            continue
        margins[name] = {}
        for baseline in BASELINES:
            for key in ("reward/sampled", "reward/greedy"):
                gaps = [per_seed[s][name][key] - per_seed[s][baseline][key] for s in seeds]
                kind = key.split("/")[1]
                margins[name][f"{kind}/over {baseline}: min"] = min(gaps)
                margins[name][f"{kind}/over {baseline}: max"] = max(gaps)
    return table, margins


def meet_table(cfg: TrainConfig, seeds: list[int] | None, command: str) -> Path:
    """The variants at cfg.seed (out/table.*), or at each of `seeds` (out/seed{s}/table.*)
    with out/table.* over the seeds and out/margins.* (MEET variants minus baselines)."""
    import ray

    out = fresh_directory(cfg.run_dir)
    per_seed = {}
    started = connect_ray(cfg)  # one cluster for every variant (a Trainer leaves it running)
    try:
        for seed in seeds or [cfg.seed]:
            seed_out = out / f"seed{seed}" if seeds else out
            per_seed[seed] = variant_results(replace(cfg, seed=seed), seed_out, command)
    finally:
        if started:
            ray.shutdown()
    if seeds:
        table, margins = over_seeds(per_seed)
        write_results(out, "table", table, command, f"MEET and its baselines over seeds {seeds}")
        write_results(out, "margins", margins, command, "each MEET variant's margin over each "
                      f"baseline, min and max over seeds {seeds}", plot_png=False)
    return out
