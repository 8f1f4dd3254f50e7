"""One joint update over several policies equals each policy's update alone: losses and every
metric, the gradients of the last step, the weights and the optimiser moments after it. The
policies differ in algorithm (a critic, group baselines, weighted likelihood, a learned
normaliser), batch size, minibatch size, epochs, micro-batching, LoRA rank and alpha and
learning rate; one of them diverges and skips its steps alone."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from helpers import contrast_batch, new_learner
from lorafleet.common.config import LoRAConfig
from lorafleet.common.records import TrainStats, UpdateDiverged
from lorafleet.common.specs import PolicySpec
from lorafleet.learner.algorithms.registry import algorithm
from lorafleet.learner.joint import concat_batches
from lorafleet.learner.model import collate

# (name, algorithm and its keys, LoRA, rows of the contrast batch it trains on)
POLICIES = [
    ("ppo", algorithm("ppo").config(minibatch_size=24, epochs=2), LoRAConfig(), 48),
    ("grpo", algorithm("grpo").config(minibatch_size=12, epochs=1, kl_mode="loss",
                                      policy_lr=3e-3), LoRAConfig(rank=16, alpha=8.0), 24),
    ("rloo", algorithm("rloo").config(minibatch_size=40, epochs=2), LoRAConfig(rank=4), 40),
    ("spr", algorithm("spr").config(minibatch_size=8, normalizer="learned"),
     LoRAConfig(rank=16), 16),
    ("bon", algorithm("best_of_n").config(minibatch_size=32, max_tokens_per_microbatch=20),
     LoRAConfig(alpha=32.0), 32),
]
NAMES = [name for name, *_ in POLICIES]


def learner(tiny_model_path, tokenizer, max_tokens_per_pass=None):
    return new_learner(tiny_model_path, tokenizer.pad_token_id, policies=tuple(
        PolicySpec(name, algo, lora, seed=i) for i, (name, algo, lora, _) in enumerate(POLICIES)),
        max_tokens_per_pass=max_tokens_per_pass)


def batches(tokenizer, learner, names, broken: str | None = None, widths: str = "same"
            ) -> dict:
    """Each policy's rows of the contrast batch; with `widths` "differ" each its own wrong
    answers (sum + 1, + 2, ...: some longer), so the joint pass pads some batches wider."""
    out = {}
    for i, (name, _, _, rows) in enumerate(POLICIES):
        if name in names:
            scored = contrast_batch(tokenizer, learner.get_version(name),
                                    offset=1 + i if widths == "differ" else 1,
                                    policy=name)[:rows]
            if name == broken:
                scored = [replace(s, reward=math.nan) for s in scored]
            out[name] = scored
    return out


def state(learner, name: str) -> dict[str, torch.Tensor]:
    """A policy's weights, their last gradients and its optimisers' moments, copied."""
    policy = learner.get_policy(name)
    params = {f"w{i}": p for i, p in enumerate(policy.core.policy_params)}
    opts = [policy.core.policy_opt]
    if policy.rl.value is not None:
        params |= {f"v{i}": p for i, p in enumerate(policy.rl.value.params)}
        opts.append(policy.rl.value.opt)
    out = {k: p.detach().clone() for k, p in params.items()}
    out |= {f"{k}.grad": p.grad.clone() for k, p in params.items() if p.grad is not None}
    for j, opt in enumerate(opts):
        for i, s in enumerate(opt.state.values()):
            out |= {f"opt{j}.{i}.{key}": v.clone() for key, v in s.items()}
    return out


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], kind: str) -> float:
    """The largest difference of the `kind` tensors ("w": weights, ".grad", "exp_avg",
    "exp_avg_sq"), relative to the largest of each tensor for all but the weights."""
    assert a.keys() == b.keys()
    keys = [k for k in a if (k.startswith(("w", "v")) and "." not in k) == (kind == "w")
            and (kind == "w" or k.endswith(kind))]
    return max(float((a[k] - b[k]).abs().max()) / (1.0 if kind == "w" else max(
        float(b[k].abs().max()), 1e-30)) for k in keys)


def assert_same_state(joint, alone, name: str, exact: bool) -> None:
    """Policy `name`'s weights, gradients and Adam moments: bitwise the same when its batch
    has the same padded width in the joint pass as alone, else within float32 reduction
    order: measured at most 9.4e-5 relative on gradients and moments, weights at most 0.8%
    of one Adam step (the learning rate) on AVX-512 and 2.2% with ATEN_CPU_CAPABILITY=avx2
    (an element whose gradient is near zero takes a step of either sign: Adam divides it by
    its own size), asserted at 1e-3 and 10%."""
    ours, theirs = state(joint, name), state(alone, name)
    if exact:
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        return
    lr = joint.get_policy(name).spec.algo.policy_lr
    assert gap(ours, theirs, "w") < 0.1 * lr, name
    for kind in (".grad", "exp_avg", "exp_avg_sq"):
        assert gap(ours, theirs, kind) < 1e-3, (name, kind)


# None: every policy's micro-batch in one pass; 200 tokens: a pass holds one or two of them
@pytest.mark.parametrize("widths, max_tokens", [("same", None), ("differ", None),
                                                ("same", 200)])
def test_a_joint_update_equals_each_policy_alone(widths, max_tokens, tiny_model_path,
                                                 tokenizer):
    joint = learner(tiny_model_path, tokenizer, max_tokens)
    alone = learner(tiny_model_path, tokenizer)
    for _ in range(2):  # the second update: moments from the first, version 1's rollouts
        together = joint.train_step(batches(tokenizer, joint, NAMES, widths=widths))
        separate = {}
        for name in NAMES:
            separate |= alone.train_step(batches(tokenizer, alone, [name], widths=widths))
        for name in NAMES:
            ours, theirs = together[name], separate[name]
            assert isinstance(ours, TrainStats) and isinstance(theirs, TrainStats)
            for key, value in vars(theirs).items():
                if key == "train_seconds" or value is None:
                    continue
                if widths == "same":
                    assert getattr(ours, key) == value, (name, key)
                else:
                    # a clip fraction counts tokens whose clipped and unclipped losses tie
                    # before the first step (the values are the old ones): float noise decides
                    # them (measured up to 0.0036 apart)
                    close = 0.01 if key.endswith("fraction") else 1e-6
                    assert getattr(ours, key) == pytest.approx(value, rel=1e-4, abs=close), \
                        (name, key)
            assert_same_state(joint, alone, name, exact=widths == "same")
            assert joint.get_version(name) == alone.get_version(name)
    assert [joint.get_version(name) for name in NAMES] == [2] * len(NAMES)


def test_a_diverging_policy_skips_its_step_alone(tiny_model_path, tokenizer):
    joint, alone = (learner(tiny_model_path, tokenizer) for _ in range(2))
    before = state(joint, "grpo")
    results = joint.train_step(batches(tokenizer, joint, NAMES, broken="grpo"))
    assert isinstance(results["grpo"], UpdateDiverged)
    assert str(results["grpo"]).startswith("policy 'grpo': the update at version 0 diverged")
    after = state(joint, "grpo")
    assert not any(k.endswith(".grad") for k in after) and after.keys() <= before.keys()
    assert all(torch.equal(after[k], before[k]) for k in after)
    assert joint.get_version("grpo") == 0
    for name in (n for n in NAMES if n != "grpo"):
        alone.train_step(batches(tokenizer, alone, [name]))
        assert_same_state(joint, alone, name, exact=True)
        assert joint.get_version(name) == 1


def test_concat_pads_each_batch_to_the_widest(tokenizer):
    short = collate([[5, 6]], [[7]], tokenizer.pad_token_id)
    long = collate([[5, 6, 8]], [[7, 9, 10]], tokenizer.pad_token_id)
    both = concat_batches([short, long], tokenizer.pad_token_id)
    assert both.input_ids.tolist() == [[5, 6, 7] + [tokenizer.pad_token_id] * 3,
                                       [5, 6, 8, 7, 9, 10]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert both.mask.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert both.positions.tolist() == [[1, 0, 0], [2, 3, 4]]
    assert concat_batches([short], 0) is short


def test_passes_hold_at_most_their_tokens(tiny_model_path, tokenizer):
    from lorafleet.learner.joint import AdapterStep, joint_passes

    batch = collate([[5, 6]] * 8, [[7, 8]] * 8, tokenizer.pad_token_id)  # 4 tokens a row

    def step(rows: int, budget=None):
        return AdapterStep("p", "p", "lm", batch, torch.arange(rows), None, None, [], None,
                           max_tokens=budget)

    sizes = [[len(rows) for _, rows, _ in p] for p in joint_passes(
        [step(8), step(4), step(2)], 40)]
    assert sizes == [[8], [4, 2]]  # 32 tokens, then 16 + 8
    assert [[len(r) for _, r, _ in p] for p in joint_passes([step(8), step(4)], None)] == [[8, 4]]
    # micro-batches of 2 rows (8 tokens): pass m holds micro-batch m of each step
    sizes = [[len(rows) for _, rows, _ in p] for p in joint_passes(
        [step(4, budget=8), step(2, budget=8)], None)]
    assert sizes == [[2, 2], [2]]
