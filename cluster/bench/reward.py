"""`lorafleet bench reward`: reward-model scoring throughput of the reward pool with 1 and 2
reward actors, measured in one run (1 actor is the baseline). Each actor loads base + reward
adapter + head and scores batches of `reward.batch_size` with `reward.threads_per_actor`
threads; Ray's ActorPool hands each batch to the next idle actor. Nothing is asserted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ...common.devices import model_dtype
from ...common.records import Prompt, Rollout
from ...common.tasks.base import Task
from ...common.tasks.registry import build_task
from ..config import load_train_config
from ..fleet import connect_ray
from ..inputs import resolve_model
from ..specs import reward_spec
from .harness import markdown_table, publish, ratio, report

ACTOR_COUNTS = (1, 2)


def answer_rollouts(task: Task, tokenizer, count: int) -> list[Rollout]:
    """`count` finished rollouts: the task's training prompts answered with the gold sum (the
    scoring cost depends on their length, not on who wrote them)."""
    examples = task.examples("train")
    out = []
    for i in range(count):
        ex = examples[i % len(examples)]
        prompt = Prompt(i, ex.prompt, tokenizer(ex.prompt).input_ids, ex.reward_columns())
        ids = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append(Rollout(prompt, 0, ids, ex.answer, [0.0] * len(ids), "stop", 0, 0))
    return out


def bench_reward(path: str | None, overrides: list[str], command: str, repeats: int = 3) -> None:
    import ray

    from ...common.tiny_model import load_tokenizer
    from ...learner.model import DTYPES, REWARD, PolicyValueModel
    from ...learner.reward_model import save_reward_model
    from ...reward.pool import RewardPool, RewardWorker

    cfg = load_train_config(path, overrides)
    model_path = resolve_model(cfg, build_task(cfg.task))
    tokenizer = load_tokenizer(model_path)
    count = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt * 4
    rollouts = answer_rollouts(build_task(cfg.task), tokenizer, count)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-rm-") as tmp:
        directory = cfg.reward.model
        if directory is None:  # the cost of a forward does not depend on trained weights
            dtype = model_dtype(cfg.model.dtype, gpu=False)  # built here, on the driver
            net = PolicyValueModel(model_path, cfg.lora, DTYPES[dtype], cfg.seed, (REWARD,))
            directory = str(save_reward_model(net, Path(tmp) / "rm", model_path, cfg.lora,
                                              dtype, {"note": "untrained (bench)"}))
            del net
        spec = reward_spec(cfg, directory)  # on the actors, whatever reward.model_on_learner
        started = connect_ray(cfg)
        rates = {}
        try:
            for n in ACTOR_COUNTS:
                actors = [ray.remote(RewardWorker).options(num_cpus=spec.threads).remote(spec)
                          for _ in range(n)]
                # warm-up: every actor loads the model and scores once
                ray.get([a.score.remote(rollouts[: cfg.reward.batch_size]) for a in actors])
                pool = RewardPool(actors, cfg.reward.batch_size, cfg.reward.timeout_s)
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    pool.score(rollouts)
                    seconds.append(time.perf_counter() - start)
                rates[n] = count / statistics.median(seconds)
                for actor in actors:
                    ray.kill(actor)
                print(f"  {n} reward actor(s): {rates[n]:8.0f} samples/s", flush=True)
        finally:
            if started:
                ray.shutdown()
    base = rates[ACTOR_COUNTS[0]]
    rows = [[str(n), f"{rate:.0f}", ratio(rate, base)] for n, rate in rates.items()]
    table = markdown_table(["reward actors", "samples/s", f"vs {ACTOR_COUNTS[0]} actor"], rows)
    publish(report(command, f"reward-model scoring ({cfg.model.name_or_path}, {count} samples in "
                   f"batches of {cfg.reward.batch_size}, {spec.threads} thread(s) per actor; "
                   f"median of {repeats})", table))
