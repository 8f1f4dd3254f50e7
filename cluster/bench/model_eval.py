"""`lorafleet eval`: zero-shot and k-shot held-out metrics of a model (optionally with a LoRA
adapter) on the config's NLU task(s): greedy answers from one in-process vLLM engine, scored by
the task's reward and official metrics."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

from ...common.configio import ConfigError
from ...common.data import encode_prompts
from ...common.run_dir import fresh_directory
from ...common.tasks.registry import build_task, task_entry
from ...reward.pool import RewardWorker
from ..config import TrainConfig
from ..evaluation import evaluate_prompts
from ..inputs import driver_tokenizer, resolve_model
from ..specs import engine_spec, reward_spec
from .harness import write_results


def adapter_rank(adapter: str) -> int:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter "
                          "directory, e.g. a run's adapter/)")
    return int(json.loads(path.read_text())["r"])


def evaluate_shots(
    cfg: TrainConfig, shots: list[int], adapter: str | None = None
) -> dict[str, dict[str, float]]:
    """{"0-shot": metrics, "k-shot": metrics, ...}: `evaluation.evaluate_prompts`'s greedy
    pass (`eval_greedy` and each task's official metrics and invalid-answer rate), and the
    prompts left out as too long for the model (`prompts_skipped`)."""
    if any(shots) and not task_entry(cfg.task.name).shots:
        raise ConfigError(f"--shots {shots}: task.name={cfg.task.name} takes no in-context "
                          "examples (an NLU task does)")
    from ...rollout.worker import RolloutWorker

    reward = RewardWorker(reward_spec(cfg, None))
    model_path = resolve_model(cfg, build_task(cfg.task))
    rank = adapter_rank(adapter) if adapter else cfg.lora.rank
    worker = RolloutWorker(dataclasses.replace(
        engine_spec(cfg, model_path), max_lora_rank=max(rank, 8),
        threads_per_worker=cfg.learner.threads))
    tokenizer = driver_tokenizer(cfg, model_path)
    generate = partial(
        worker.generate, max_tokens=cfg.rollout.max_new_tokens, use_policy=False,
        lora=worker.lora_from_disk(adapter) if adapter else None, stop=cfg.rollout.stop,
        stop_token_ids=cfg.rollout.stop_token_ids,
    )
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    results = {}
    for k in shots:
        task = build_task(dataclasses.replace(cfg.task, shots=k))
        skipped: list[str] = []
        prompts = encode_prompts(task.examples("eval"), tokenizer, limit, skipped=skipped)
        results[f"{k}-shot"] = {
            **evaluate_prompts(generate, reward.score, prompts, task, cfg.rollout, cfg.seed,
                               sampled=False),
            "prompts_skipped": len(skipped),
        }
        print(f"{k}-shot: " + ", ".join(f"{m} {v:.3g}" for m, v in results[f"{k}-shot"].items()))
    del worker, generate  # frees the engine's KV cache before anything else starts
    return results


def run_eval(cfg: TrainConfig, shots: list[int], adapter: str | None, command: str) -> Path:
    run_dir = fresh_directory(cfg.run_dir)
    results = evaluate_shots(cfg, shots, adapter)
    write_results(run_dir, "eval", results, command, f"{cfg.model.name_or_path}"
                  + (f" + {adapter}" if adapter else "") + f" on {cfg.task.name}, held-out",
                  plot_png=False)
    return run_dir
