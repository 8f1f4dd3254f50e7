"""`lorafleet eval`: zero-shot and k-shot held-out metrics of a model (optionally with a LoRA
adapter) on the config's NLU task(s): greedy answers from one in-process vLLM engine, scored by
the task's reward and official metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ...common.configio import ConfigError
from ...common.data import encode_prompts
from ...common.run_dir import fresh_directory
from ...common.tasks.registry import build_task, task_entry
from ...reward.pool import RewardWorker
from ..config import TrainConfig
from ..fleet import driver_tokenizer, resolve_model, reward_spec
from .harness import write_table


def adapter_rank(adapter: str) -> int:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there (a PEFT adapter "
                          "directory, e.g. a run's adapter/)")
    return int(json.loads(path.read_text())["r"])


def evaluate_shots(
    cfg: TrainConfig, shots: list[int], adapter: str | None = None
) -> dict[str, dict[str, float]]:
    """{"0-shot": metrics, "k-shot": metrics, ...}: `eval_greedy` (mean reward of the greedy
    answers), each task's official metrics and invalid-answer rate, prompts left out as too
    long for the model (`prompts_skipped`)."""
    if any(shots) and not task_entry(cfg.task.name).shots:
        raise ConfigError(f"--shots {shots}: task.name={cfg.task.name} takes no in-context "
                          "examples (an NLU task does)")
    from ...rollout.worker import RolloutWorker

    reward = RewardWorker(reward_spec(cfg, None))
    model_path = resolve_model(cfg)
    rank = adapter_rank(adapter) if adapter else cfg.lora.rank
    worker = RolloutWorker(
        model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
        max_lora_rank=max(rank, 8), seed=cfg.seed, kv_cache_gib=cfg.rollout.kv_cache_gib,
        threads=cfg.learner.threads,
    )
    tokenizer = driver_tokenizer(cfg, model_path)
    lora = worker.lora_from_disk(adapter, 1) if adapter else None
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    results = {}
    for k in shots:
        task = build_task(dataclasses.replace(cfg.task, shots=k))
        skipped: list[str] = []
        prompts = encode_prompts(task.examples("eval"), tokenizer, limit, skipped=skipped)
        rollouts = worker.generate(
            prompts, n=1, temperature=0.0, max_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed,
            lora=lora, use_policy=False, stop=cfg.rollout.stop,
            stop_token_ids=cfg.rollout.stop_token_ids,
        )
        pairs = [(r.response_text, r.prompt.reference) for r in rollouts]
        scored = reward.score(rollouts)
        results[f"{k}-shot"] = {
            "eval_greedy": sum(s.reward for s in scored) / len(scored),
            **task.answer_metrics(pairs), "prompts_skipped": len(skipped),
        }
        print(f"{k}-shot: " + ", ".join(f"{m} {v:.3g}" for m, v in results[f"{k}-shot"].items()))
    del worker  # frees the engine's KV cache before anything else starts
    return results


def run_eval(cfg: TrainConfig, shots: list[int], adapter: str | None) -> Path:
    run_dir = fresh_directory(cfg.run_dir)
    results = evaluate_shots(cfg, shots, adapter)
    write_table(run_dir, "eval", results, plot_png=False)
    print(f"wrote {run_dir / 'eval.md'} and {run_dir / 'eval.json'}")
    return run_dir
