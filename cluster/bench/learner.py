"""`lorafleet bench learner`: one joint update over N adapters' batches against N one-adapter
updates of the same batches and against one adapter's update alone, on one learner in this
process (no Ray, no engine: the learner's own step is what is measured).

Two shapes: `small`, the default job's update on the embedded model (PPO with its critic, the
default batch of 64 prompts x 4 samples, 2 epochs of 64-row minibatches), and `large`, where
compute dominates: a random-init 28M-parameter Llama of the embedded recipe at hidden 512, 8
layers (GRPO, 64 rows of 64 response tokens, one step). Each policy of a learner trains on its
own batch of synthetic rollouts of the addition prompts (random response tokens, rewards 0 or
1), at its own version, so every update is a real one.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ...common.config import LoRAConfig
from ...common.records import Prompt, Rollout, ScoredRollout
from .harness import markdown_table, publish, ratio, report


@dataclass(frozen=True)
class Shape:
    model: dict  # TinyModelSpec keys
    algo: dict  # the algorithm's keys (its name among them)
    rows: int  # per adapter: prompts x samples
    samples: int
    response_tokens: int


SHAPES = {
    "small": Shape({}, {"name": "ppo"}, 256, 4, 6),
    "large": Shape({"hidden_size": 512, "num_layers": 8, "num_heads": 8,
                    "intermediate_size": 1536, "sft_steps": 0},
                   {"name": "grpo", "epochs": 1, "minibatch_size": 64, "kl_mode": "loss"},
                   64, 4, 64),
}


def synthetic_batch(tokenizer, shape: Shape, version: int, policy: str, seed: int
                    ) -> list[ScoredRollout]:
    """shape.rows rollouts of policy `policy` at `version`: the addition task's training
    prompts, `samples` each, of random response tokens and random 0/1 rewards."""
    from ...common.tasks.addition import AdditionTask

    rng = random.Random(seed)
    vocab = len(tokenizer)
    examples = AdditionTask().examples("train")[: shape.rows // shape.samples]
    out = []
    for i, ex in enumerate(examples):
        prompt = Prompt(i, ex.prompt, tokenizer(ex.prompt).input_ids, {"reference": ex.answer})
        for k in range(shape.samples):
            length = rng.randint(1, shape.response_tokens)
            ids = [rng.randrange(3, vocab) for _ in range(length)]
            out.append(ScoredRollout(Rollout(prompt, k, ids, "", [0.0] * length, "length",
                                             version, 0, policy), float(rng.random() < 0.5)))
    return out


def build_learner(shape: Shape, adapters: int, threads: int, device: str):
    """A learner of `adapters` policies (seeds 0.., LoRA rank 8) of the shape's algorithm on
    its model."""
    from ...common.specs import LearnerSpec, PolicySpec
    from ...common.tasks.addition import AdditionTask
    from ...common.tiny_model import TinyModelSpec, build_tiny_model, load_tokenizer
    from ...learner.actor import Learner
    from ...learner.algorithms.registry import algorithm

    path = str(build_tiny_model(AdditionTask(), TinyModelSpec(**shape.model)))
    tokenizer = load_tokenizer(path)
    algo = algorithm(shape.algo["name"]).config(**shape.algo)
    policies = tuple(PolicySpec(f"p{i}", algo, LoRAConfig(), seed=i) for i in range(adapters))
    learner = Learner(LearnerSpec(path, tokenizer.pad_token_id, policies, dtype="float32",
                                  threads=threads, device=device))
    return learner, tokenizer


def timed(learner, tokenizer, shape: Shape, calls: list[list[str]], repeats: int) -> float:
    """Median seconds of one round of `calls` (each a list of policies updated in one
    learner call), after one warm-up round."""
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for names in calls:
            batches = {name: synthetic_batch(tokenizer, shape, learner.get_version(name), name,
                                             seed=100 * r + i) for i, name in enumerate(names)}
            results = learner.train_step(batches)
            failed = [n for n, result in results.items() if isinstance(result, Exception)]
            if failed:
                raise RuntimeError(f"the update of {failed} diverged: {results[failed[0]]}")
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_learner(adapter_counts: list[int], scales: list[str], repeats: int, threads: int,
                  device: str, out: Path, command: str) -> dict:
    """Per scale and N: seconds of the joint update, of the N one-adapter updates one after
    the other, and of one adapter's update alone, with their ratios."""
    results: dict[str, dict] = {}
    rows = []
    for scale in scales:
        shape = SHAPES[scale]
        learner, tokenizer = build_learner(shape, max(adapter_counts), threads, device)
        names = learner.policy_names()
        alone = timed(learner, tokenizer, shape, [names[:1]], repeats)
        for n in adapter_counts:
            print(f"bench learner: {scale}, {n} adapters", flush=True)
            joint = timed(learner, tokenizer, shape, [names[:n]], repeats)
            separate = timed(learner, tokenizer, shape, [[name] for name in names[:n]],
                             repeats)
            results[f"{scale}/{n}"] = {"joint_s": joint, "separate_s": separate,
                                       "alone_s": alone}
            rows.append([scale, str(n), f"{joint:.3f}", f"{separate:.3f}",
                         ratio(joint, separate), ratio(joint, alone)])
    table = markdown_table(
        ["shape", "adapters", "one joint update (s)", "N one-adapter updates (s)",
         "joint / N one-adapter", "joint / one adapter alone"], rows)
    notes = ("\nsmall: the default job's PPO update (256 rows, 2 epochs of 64-row minibatches, "
             "critic included) on the embedded model; large: a GRPO step on 64 rows of 64 "
             "tokens of a 28M random-init Llama. Median of "
             f"{repeats} rounds after a warm-up; float32, {threads} threads, {device}.\n")
    publish(report(command, "Many adapters in one pass: the learner's update", table + notes),
            out / "bench-learner.md")
    return results
