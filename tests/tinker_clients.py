"""Client-side loops for the Tinker service tests, written against the `tinker` SDK only (as
a user's script is): supervised learning and an RL loop in tinker-cookbook's style on the
addition task, and greedy evaluation through a sampler; and `lorafleet serve` run as a user runs
it, for them to talk to."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from lorafleet.common.tasks.addition import AdditionTask

TASK = AdditionTask()


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the embedded model was warm-started on it (its own BOS)."""
    return tokenizer(prompt).input_ids


def sft_datum(tokenizer, prompt: str, answer: str) -> types.Datum:
    """Next-token targets over prompt + answer + EOS, weighted on the answer only."""
    ids = prompt_ids(tokenizer, prompt)
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    tokens = ids + answer_ids
    weights = [0.0] * (len(ids) - 1) + [1.0] * len(answer_ids)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": np.array(tokens[1:], dtype=np.int64),
        "weights": np.array(weights, dtype=np.float32)})


def greedy_answers(sampler, tokenizer, prompts: list[str]) -> list[str]:
    futures = [sampler.sample(types.ModelInput.from_ints(prompt_ids(tokenizer, p)), 1,
                              types.SamplingParams(max_tokens=6, temperature=0.0))
               for p in prompts]
    return [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip()
            for f in futures]


def fraction(answers: list[str], targets: list[str]) -> float:
    return sum(a == t for a, t in zip(answers, targets, strict=True)) / len(targets)


def train_sl(client: tinker.TrainingClient, tokenizer, offset: int, steps: int, seed: int,
             batch: int = 32, lr: float = 1e-3) -> list[float]:
    """Supervised steps on sum + offset; the per-token loss of each step's batch."""
    rng = random.Random(seed)
    train = TASK.examples("train")
    losses = []
    for _ in range(steps):
        rows = rng.sample(train, batch)
        data = [sft_datum(tokenizer, ex.prompt, str(int(ex.answer) + offset)) for ex in rows]
        backward = client.forward_backward(data, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=lr))
        result = backward.result()
        step.result()
        tokens = sum(float(np.sum(d.loss_fn_inputs["weights"].to_numpy())) for d in data)
        losses.append(result.metrics["loss:sum"] / tokens)
    return losses


def train_rl(client: tinker.TrainingClient, tokenizer, steps: int, seed: int,
             prompts_per_step: int = 16, group: int = 4, lr: float = 1e-3
             ) -> tuple[list[float], float]:
    """The cookbook's RL loop: a sampler of the current weights per step, a group of samples
    per prompt, reward 1 for the exact sum, centred within the group, importance_sampling.
    Returns each step's mean reward, and the largest gap between a sample's logprobs and
    compute_logprobs of the same tokens (checked on each step's first sample)."""
    rng = random.Random(seed)
    train = TASK.examples("train")
    rewards, gap = [], 0.0
    for _ in range(steps):
        sampler = client.save_weights_and_get_sampling_client().result()
        rows = rng.sample(train, prompts_per_step)
        inputs = [types.ModelInput.from_ints(prompt_ids(tokenizer, ex.prompt)) for ex in rows]
        futures = [sampler.sample(prompt, group, types.SamplingParams(
            max_tokens=6, temperature=1.0, seed=rng.randrange(2**31))) for prompt in inputs]
        data, step_rewards = [], []
        for ex, prompt, future in zip(rows, inputs, futures, strict=True):
            sequences = future.result().sequences
            scores = [float(tokenizer.decode(s.tokens, skip_special_tokens=True).strip()
                            == ex.answer) for s in sequences]
            step_rewards += scores
            mean = sum(scores) / len(scores)
            for sequence, score in zip(sequences, scores, strict=True):
                if score == mean:
                    continue
                ob = prompt.length - 1
                tokens = prompt.to_ints() + sequence.tokens
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
                        "target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "logprobs": np.array([0.0] * ob + sequence.logprobs, dtype=np.float32),
                        "advantages": np.array([0.0] * ob + [score - mean] * len(
                            sequence.tokens), dtype=np.float32)}))
        first = futures[0].result().sequences[0]
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(
            inputs[0].to_ints() + first.tokens)).result()[inputs[0].length:]
        gap = max(gap, max(abs(a - b) for a, b in zip(scored, first.logprobs, strict=True)))
        rewards.append(sum(step_rewards) / len(step_rewards))
        if data:
            backward = client.forward_backward(data, "importance_sampling")
            client.optim_step(types.AdamParams(learning_rate=lr)).result()
            backward.result()
    return rewards, gap


@contextmanager
def running_server(run_dir: Path, keys: list[str], env: dict[str, str]) -> Iterator[str]:
    """`lorafleet serve run_dir=RUN_DIR KEYS` as a process, until the block ends (then
    interrupted, as Ctrl-C stops it); yields its base URL. Its output goes to
    RUN_DIR/server.log."""
    with (run_dir / "server.log").open("w") as log:
        proc = subprocess.Popen(["lorafleet", "serve", f"run_dir={run_dir}", *keys], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        address = run_dir / "server.json"
        deadline = time.monotonic() + 300
        while not address.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("lorafleet serve did not start:\n"
                            + (run_dir / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        try:
            yield json.loads(address.read_text())["base_url"]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
