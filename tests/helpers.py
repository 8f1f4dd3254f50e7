"""Test-only building blocks (importable by Ray workers too: conftest puts tests/ on their path)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import fields

import torch

from lorafleet.cluster.accounting import prompts_not_once
from lorafleet.common.records import POLICY, Prompt, Rollout, ScoredRollout
from lorafleet.common.specs import LearnerSpec, PolicySpec
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.common.tasks.registry import build_task
from lorafleet.common.tiny_model import TinyModelSpec
from lorafleet.learner.actor import Learner
from lorafleet.learner.algorithms.registry import PPOConfig
from lorafleet.reward.rules import exact_match

# The Qwen2-architecture addition model the hot-swap tests serve beside the Llama one (q/k/v
# bias, packed projections): a short warm start, enough for the sums' first tokens to be
# sharp; shipped (common/models/) like the configs' models.
QWEN2_ADDITION = TinyModelSpec(architecture="qwen2", sft_steps=200)


def new_learner(model_path: str, pad_id: int, algo=None, policies=None, **keys) -> Learner:
    """A float32 CPU learner with 2 threads of `policies` (PolicySpecs; default: the one
    policy, of `algo` (default: PPO) and the PolicySpec `keys` among `keys`, seed 0) and the
    LearnerSpec `keys` (default: an rl stage)."""
    own = {f.name for f in fields(PolicySpec)}
    policy = {key: keys.pop(key) for key in own & keys.keys()}
    policies = policies or (PolicySpec(algo=algo or PPOConfig(), **policy),)
    return Learner(LearnerSpec(model_path, pad_id, tuple(policies), dtype="float32", threads=2,
                               **keys))


def perturbed_learner(
    model_path: str, pad_id: int, seed: int = 0, scale: float = 0.05
) -> Learner:
    """A PPO learner whose policy adapter is not the identity (PEFT inits lora_B to zero)."""
    learner = new_learner(model_path, pad_id, seed=seed)
    perturb_policy(learner, seed + 1, scale)
    return learner


def perturb_policy(learner: Learner, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in learner.net.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def reward_raises_on_7(completions: list[str], **kwargs) -> list[float]:
    if any("7" in c for c in completions):
        raise KeyError("no rule for 7")
    return [1.0] * len(completions)


def reward_nan_when_wrong(completions: list[str], reference: list[str], **kwargs) -> list[float]:
    return [1.0 if c == ref else math.nan for c, ref in zip(completions, reference, strict=True)]


def exact_sum_plus_one(completions: list[str], reference: list[str], **kwargs) -> list[float]:
    """1.0 where the completion is the addition task's sum + 1: a target opposite to
    exact_match's."""
    return [float(c.strip() == str(int(ref) + 1))
            for c, ref in zip(completions, reference, strict=True)]


def reward_raises_on_training_prompts(prompts: list[str], completions: list[str],
                                      reference: list[str], **kwargs) -> list[float]:
    """exact_match on the default addition task's held-out prompts; raises on any other, so
    a policy scored by it passes its start evaluation and fails on its first training batch."""
    held_out = {e.prompt for e in AdditionTask().examples("eval")}
    if any(p not in held_out for p in prompts):
        raise ValueError("this reward refuses training prompts")
    return exact_match(completions, reference)


# reward functions that break TRL's contract (tests/unit/test_dataset_task.py)
def fn_without_completions(x):
    return [0.0]


def fn_without_kwargs(completions, solution):
    return [0.0] * len(completions)


def fn_wrong_length(completions, **kwargs):
    return [1.0]


def fn_none(completions, **kwargs):
    return [None] * len(completions)


def fn_raises_timeout(completions, **kwargs):
    raise TimeoutError("the grader's server did not answer")


def fn_strings(completions, **kwargs):
    return ["1.0"] * len(completions)


def fn_inf(completions, **kwargs):
    return [math.inf] * len(completions)


def fn_scalar(completions, **kwargs):
    return 1.0


def fn_never_returns(completions, **kwargs):
    time.sleep(3600)


def contrast_batch(tokenizer, version: int, offset: int = 1,
                   policy: str = POLICY) -> list[ScoredRollout]:
    """32 prompts x [correct answer (reward 1), the sum + offset (reward 0)], prompt-major,
    sampled by `policy`; offset 1 is the shipped model's habit."""
    out = []
    for i, ex in enumerate(AdditionTask().examples("train")[:32]):
        prompt = Prompt(i, ex.prompt, tokenizer(ex.prompt).input_ids, {"reference": ex.answer})
        wrong = str(int(ex.answer) + offset)
        for k, (text, reward) in enumerate(((ex.answer, 1.0), (wrong, 0.0))):
            ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rollout = Rollout(prompt, k, ids, text, [0.0] * len(ids), "stop", version, 0,
                              policy)
            out.append(ScoredRollout(rollout, reward))
    return out


def train_config_error(overrides: list[str], tmp_path, capsys, monkeypatch) -> str:
    """`lorafleet train` with `overrides`, expected to stop with a one-line error before Ray
    starts and before the run directory exists; returns that line."""
    import huggingface_hub.constants
    import pytest

    import lorafleet.cluster.warm
    from lorafleet.cluster.cli import main
    from lorafleet.common.logs import library_env

    for key, value in library_env().items():
        monkeypatch.setenv(key, value)  # main() sets them: undone after the test

    def no_ray(cfg):
        raise AssertionError("connect_ray was called")

    monkeypatch.setattr(lorafleet.cluster.warm, "connect_ray", no_ray)  # join_or_connect's
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network call
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *overrides, f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    return err


def lorafleet(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """The `lorafleet` CLI in a process group of its own (a Ray cluster it starts included),
    its stderr with its stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cluster.cli", *args], stdout=stdout,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def assert_each_prompt_once(run_dir, cfg, tokenizer) -> None:
    """Each iteration's rollouts (Parquet) are its PromptStream batch, n samples each."""
    problems = prompts_not_once(run_dir, cfg, tokenizer)
    assert not problems, problems


def table_cells(markdown: str) -> dict[str, list[str]]:
    """A Markdown table's rows (the header's too) by their first cell, each row's other cells
    stripped: what a reader sees, whatever the spacing."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows if set(row[0]) != {"-"}}


def numbers(cells: list[str]) -> list[float]:
    """The numbers in table cells, in order ("0.875 ± 0.035" is two, "3.40x" one)."""
    return [float(x) for cell in cells for x in re.findall(r"[-+]?\d+(?:\.\d+)?", cell)]


MARGINS_FILE = "LORAFLEET_MARGINS"  # where assert_margin records what it measured


def assert_margin(name: str, value: float, floor: float, detail: object = "") -> None:
    """A learning margin of an end-to-end run: `value` must exceed `floor` (set well below the
    smallest value measured over seeds and float paths). With $LORAFLEET_MARGINS naming a
    file, each measured value is appended to it as a JSON line with the float path it ran on,
    so one suite run on another CPU, thread count or ATEN_CPU_CAPABILITY reports every
    margin, not only the failing ones (docs/testing.md)."""
    path = os.environ.get(MARGINS_FILE)
    if path:
        record = {"name": name, "value": round(value, 4), "floor": floor,
                  "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "default"),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        with open(path, "a") as out:
            out.write(json.dumps(record) + "\n")
    assert value > floor, f"{name}: {value:.4f}, not above {floor} {detail}"


def fraction(answers: list[str], targets: list[str]) -> float:
    return sum(a == t for a, t in zip(answers, targets, strict=True)) / len(targets)


def hf_greedy_reward(model, cfg, model_path: str) -> float:
    gold = [e.answer for e in build_task(cfg.task).examples("eval")]
    return fraction(hf_greedy_answers(model, cfg, model_path), gold)


def hf_greedy_answers(model, cfg, model_path: str) -> list[str]:
    """HF greedy decoding's answer (stripped) to each held-out prompt of the task."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    examples = build_task(cfg.task).examples("eval")
    answers = []
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
            out = model.generate(
                **enc, max_new_tokens=cfg.rollout.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, enc.input_ids.shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens,
                                                                  skip_special_tokens=True)]
    return answers


SLOW_BATCHES_LEFT = [1]  # per process: each reward actor is slow on its first training batch


def exact_match_slow_on_training_prompts(prompts: list[str], completions: list[str],
                                         reference: list[str], **kwargs) -> list[float]:
    """exact_match, 1 s late on the first batch of training prompts each reward actor scores:
    its policy's first batch is late for the policies scored at once (late_policy_wait_s)."""
    held_out = {e.prompt for e in AdditionTask().examples("eval")}
    if SLOW_BATCHES_LEFT[0] and any(p not in held_out for p in prompts):
        SLOW_BATCHES_LEFT[0] -= 1
        time.sleep(1.0)
    return exact_match(completions, reference)
