"""`lorafleet bench rollout`: the rollout fleet against raw vLLM, measured in one run.

1. Baseline: one in-process vLLM engine with the fleet's whole thread budget generates the
   training workload (same prompts, n, max tokens), with the base model and with a LoRA active.
2. Fleet: a short training run through the real actors; its per-iteration rollout tokens/s
   and publish->all-workers-serving latency come from metrics.jsonl.
Prints the ratios; nothing here is asserted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ...common.data import PromptStream, encode_prompts, pad_token_id
from ...common.metrics import read_metrics
from ...common.tasks.registry import build_task
from ..config import load_train_config
from ..inputs import resolve_model
from ..specs import engine_spec, rollout_workers
from .harness import markdown_table, publish, ratio, report, train

WARMUP_ITERATIONS = 2  # engine warm-up (first compiles, allocator growth) is not steady state


def raw_vllm_tokens_per_s(cfg, model_path: str, repeats: int = 3) -> tuple[float, float]:
    """(base model tok/s, LoRA tok/s) of one engine given all the fleet's threads."""
    from ...common.specs import LearnerSpec, PolicySpec
    from ...common.tiny_model import load_tokenizer
    from ...learner.actor import Learner
    from ...rollout.worker import RolloutWorker

    tokenizer = load_tokenizer(model_path)
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    examples = build_task(cfg.task).examples("train")
    stream = PromptStream(encode_prompts(examples, tokenizer, limit), cfg.seed)
    threads = rollout_workers(cfg) * cfg.rollout.threads_per_worker
    # the whole rollout group's threads in one engine
    engine = RolloutWorker(replace(engine_spec(cfg, model_path), threads_per_worker=threads))
    learner = Learner(LearnerSpec(
        model_path, pad_token_id(tokenizer),
        (PolicySpec(algo=cfg.algo, lora=cfg.lora, seed=cfg.seed),), dtype=cfg.model.dtype,
        threads=threads,
    ))
    engine.load_snapshot(learner.publish())

    def rate(use_policy: bool) -> float:
        rates = []
        for i in range(repeats + 1):
            prompts = stream.next_batch(cfg.prompts_per_iteration)
            start = time.perf_counter()
            rollouts = engine.generate(
                prompts, n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                max_tokens=cfg.rollout.max_new_tokens, seed=i, use_policy=use_policy,
            )
            seconds = time.perf_counter() - start
            if i:  # the first call warms the engine up
                rates.append(sum(len(r.response_ids) for r in rollouts) / seconds)
        return statistics.median(rates)

    return rate(use_policy=False), rate(use_policy=True)


def bench_rollout(path: str | None, overrides: list[str], command: str) -> None:
    cfg = load_train_config(path, overrides)
    if cfg.iterations <= WARMUP_ITERATIONS:
        cfg = replace(cfg, iterations=WARMUP_ITERATIONS + 6)
    model_path = resolve_model(cfg, build_task(cfg.task))
    base_tps, lora_tps = raw_vllm_tokens_per_s(cfg, model_path)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        run_cfg = replace(cfg, checkpoint_every=0)
        rows = read_metrics(train(run_cfg, Path(tmp) / "run"))[WARMUP_ITERATIONS:]
    fleet_tps = statistics.median(r["rollout_tokens_per_s"] for r in rows)
    sync_s = statistics.median(r["sync_seconds"] for r in rows)
    step_s = statistics.median(r["step_seconds"] for r in rows)
    table = markdown_table(["", "tok/s", "vs raw vLLM with LoRA"], [
        ["raw vLLM, base model, one engine", f"{base_tps:.0f}", ratio(base_tps, lora_tps)],
        ["raw vLLM, LoRA active, one engine", f"{lora_tps:.0f}", ratio(lora_tps, lora_tps)],
        ["fleet during training (end to end)", f"{fleet_tps:.0f}", ratio(fleet_tps, lora_tps)],
    ])
    publish(report(command, f"rollout benchmark ({len(rows)} steady iterations; model "
                   f"{cfg.model.name_or_path}, {rollout_workers(cfg)} workers, "
                   f"{cfg.prompts_per_iteration} prompts x {cfg.rollout.samples_per_prompt} "
                   f"samples x <= {cfg.rollout.max_new_tokens} tokens)", table)
            + f"\nadapter publish -> all serving: {sync_s * 1000:.1f} ms ({sync_s / step_s:.1%} "
            f"of a {step_s:.2f} s iteration)\n")
