"""The paper's result table in one command: zero-shot, k-shot, then each stage of the config's
chain (e.g. SFT, SFT+PPO), per task and official metric, as Markdown, JSON and a PNG."""

from __future__ import annotations

from pathlib import Path

from ...common.run_dir import fresh_directory
from ..config import TrainConfig
from .harness import train, write_results
from .model_eval import evaluate_shots


def stage_label(stages: list[str], index: int, algo: str) -> str:
    """"SFT", "SFT+PPO", ...: the chain up to and including stage `index`."""
    names = [algo.upper() if s == "rl" else s.upper() for s in stages[: index + 1]]
    return "+".join(names)


def nlu_table(cfg: TrainConfig, shots: int, command: str) -> Path:
    """Zero-/k-shot of the base model (`lorafleet eval`), then the config's stage chain with its
    held-out evaluation after each stage (`lorafleet train`): both through
    `evaluation.evaluate_prompts`."""
    out = fresh_directory(cfg.run_dir)
    results = evaluate_shots(cfg, [0, shots] if shots else [0])
    summary = train(cfg, out / "train").read_summary()
    for index, row in enumerate(summary["stage_evals"][1:]):
        label = stage_label(cfg.stages, index, cfg.algo.name)
        results[label] = {k: v for k, v in row.items() if k != "stage"}
    write_results(out, "table", results, command, f"{cfg.task.name}: zero-shot, {shots}-shot "
                  f"and the chain {' -> '.join(cfg.stages)}, held-out")
    return out
