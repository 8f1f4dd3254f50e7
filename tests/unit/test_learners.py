"""Every learner, on a real PEFT model, moves probability from a prompt's zero-reward sample
to its rewarded one; critic-free learners carry no value adapter."""

from __future__ import annotations

import pytest
import torch

from helpers import contrast_batch, new_learner
from lorafleet.common.devices import attention_kernel, autocast_dtype, native_bf16
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.learner import objectives
from lorafleet.learner.actor import train_one
from lorafleet.learner.algorithms.registry import (
    ALGORITHMS,
    GRPOConfig,
    SPRConfig,
    algorithm,
    objective_function,
)
from lorafleet.learner.model import collate_scored


def margin(learner, tokenizer) -> float:
    """Mean log-prob gap between the rewarded and the unrewarded sample of each prompt."""
    batch = collate_scored(contrast_batch(tokenizer, learner.version), tokenizer.pad_token_id)
    with torch.no_grad():
        seq = (learner.net.logprobs(batch) * batch.mask).sum(-1)
    return float((seq[0::2] - seq[1::2]).mean())


# Margin gains after 3 updates on the shipped model, measured over learner seeds 0-2, with 2
# threads and with 1 thread + ATEN_CPU_CAPABILITY=avx2 (same to 3 decimals): ppo 3.32-3.42,
# grpo 3.25-3.44, rloo 3.25-3.44, best_of_n 3.39-3.58, spr 2.94-3.01 (SPR also pulls the near
# miss up, with weight 0.24 against 1.76). Asserted at about half of the smallest.
MIN_GAIN = {"ppo": 1.6, "grpo": 1.6, "rloo": 1.6, "best_of_n": 1.6, "spr": 1.4}


@pytest.mark.parametrize("name", sorted(MIN_GAIN))
def test_learner_prefers_rewarded_samples(name, tiny_model_path, tokenizer):
    learner = make_learner(name, tiny_model_path, tokenizer)
    assert (learner.net.value_head is not None) == (name == "ppo")
    before = margin(learner, tokenizer)
    for _ in range(3):
        stats = train_one(learner, contrast_batch(tokenizer, learner.version))
    assert learner.version == 3 and stats.adapter_version == 2
    gain = margin(learner, tokenizer) - before
    assert gain > MIN_GAIN[name], f"{name}: log-prob margin moved by {gain:.3f}"
    if name in ("spr", "best_of_n"):
        assert stats.weight_max == (2.0 if name == "best_of_n" else pytest.approx(1.7616, abs=1e-3))
        # spr: 2 * softmax([1, 0] / 0.5)[0] = 2 * e^2 / (e^2 + 1) = 1.7616 (weight_temperature 0.5)


def test_every_registered_algorithm_has_its_objective(tiny_model_path, tokenizer):
    for spec in ALGORITHMS.values():
        assert objective_function(spec.config()) is getattr(objectives, spec.name), spec
    learned = SPRConfig(normalizer="learned")
    assert objective_function(learned) is objectives.spr_learned_normalizer
    assert learned.value_model and not SPRConfig().value_model
    # no rl stage: sft, dpo, rm and meet only; no RL updater, no value adapter
    offline = new_learner(tiny_model_path, tokenizer.pad_token_id, stages=("sft",))
    assert offline.rl is None and offline.net.value_head is None


def make_learner(name, tiny_model_path, tokenizer, **keys):
    algo = algorithm(name).config(**{"minibatch_size": 32, **keys})
    return new_learner(tiny_model_path, tokenizer.pad_token_id, algo)


def prompt_values(learner, batch):
    """V(x): the value adapter's value before the first response token ([B])."""
    return learner.net.values(batch, learner.rl.value.name)[:, 0]


def test_single_sample_spr_learns_its_normaliser(tiny_model_path, tokenizer):
    """N=1: each prompt's one sample is weighted by exp((r - V(x)) / weight_temperature) with
    a learned V."""
    learner = make_learner("spr", tiny_model_path, tokenizer, normalizer="learned")
    assert learner.net.value_head is not None

    def single():  # the rewarded sample of each prompt, as if N=1
        batch = contrast_batch(tokenizer, learner.version)
        return [s for s in batch if s.rollout.sample_index == 0]

    rows = collate_scored(single(), tokenizer.pad_token_id)
    with torch.no_grad():
        v_before = float(prompt_values(learner, rows).mean())
    before = margin(learner, tokenizer)
    for _ in range(3):
        stats = train_one(learner, single())
    # V regresses towards the reward of 1.0, so the weights exp((1 - V) / 0.5) shrink
    with torch.no_grad():
        v_after = float(prompt_values(learner, rows).mean())
    assert abs(1.0 - v_after) < abs(1.0 - v_before), (v_before, v_after)
    assert stats.value_loss is not None and stats.weight_max <= 4.0
    assert margin(learner, tokenizer) > before


def test_sft_and_dpo_steps(tiny_model_path, tokenizer):
    from lorafleet.common.corpora import DatasetConfig, load_preferences, load_sft

    task = AdditionTask()
    learner = make_learner("spr", tiny_model_path, tokenizer)
    examples = load_sft(DatasetConfig(max_rows=32), task, tokenizer, 64).items
    losses = [learner.sft_step(examples).loss for _ in range(5)]
    assert losses[-1] < losses[0] and learner.version == 5
    # DPO: the preference margin against the adapter-off reference grows from 0
    pairs = load_preferences(DatasetConfig(max_rows=32), task, tokenizer, 64).items
    fresh = make_learner("spr", tiny_model_path, tokenizer)
    fresh.start_stage(2e-3)
    stats = [fresh.dpo_step(pairs, beta=0.5) for _ in range(5)]
    assert stats[0].reward_margin == pytest.approx(0.0, abs=1e-6)  # adapter starts as identity
    assert stats[-1].reward_margin > 0.05 and stats[-1].preference_accuracy > 0.5
    assert stats[-1].loss < stats[0].loss


def policy_after_one_step(learner, tokenizer) -> list[torch.Tensor]:
    """The policy adapter after one plain-SGD step on the whole contrast batch: the step is
    the (clipped) gradient itself, which Adam's first step would reduce to its sign."""
    learner.core.policy_opt = torch.optim.SGD(learner.core.policy_params, lr=1.0)
    train_one(learner, contrast_batch(tokenizer, learner.version))
    return [p.detach().clone() for p in learner.core.policy_params]


@pytest.mark.parametrize("name", ["ppo", "spr"])  # losses averaged over tokens, over rows
def test_micro_batches_accumulate_the_minibatch_gradient(name, tiny_model_path, tokenizer):
    """One row per micro-batch (a 1-token budget) against the whole 64-row minibatch; the
    responses differ in length, so a token-averaged loss needs token-share weights."""
    keys = dict(epochs=1, minibatch_size=64)
    whole = policy_after_one_step(make_learner(name, tiny_model_path, tokenizer, **keys),
                                  tokenizer)
    micro = policy_after_one_step(make_learner(
        name, tiny_model_path, tokenizer, max_tokens_per_microbatch=1, **keys), tokenizer)
    start = make_learner(name, tiny_model_path, tokenizer, **keys).core.policy_params
    moved = max(float((w - s.detach()).abs().max()) for w, s in zip(whole, start, strict=True))
    gap = max(float((w - m).abs().max()) for w, m in zip(whole, micro, strict=True))
    # measured: moved 0.036 (ppo), 0.109 (spr); gap 2e-8, 6e-8 (spr weighted by token share
    # instead: 0.011)
    assert moved > 1e-3 and gap < 1e-6, (moved, gap)


def test_gradient_checkpointing_changes_memory_not_the_step(tiny_model_path, tokenizer):
    algo = algorithm("grpo").config(epochs=1, minibatch_size=64)

    def learner(checkpointing: bool):
        return new_learner(tiny_model_path, tokenizer.pad_token_id, algo,
                           gradient_checkpointing=checkpointing, attn_implementation="sdpa")

    plain, checkpointed = learner(False), learner(True)
    layers = [m for m in checkpointed.net.model.modules() if getattr(m, "gradient_checkpointing",
                                                                     False)]
    assert layers and all(m.training for m in layers)  # transformers checkpoints in training
    a, b = (policy_after_one_step(x, tokenizer) for x in (plain, checkpointed))
    assert max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)) < 1e-6


def forward_rows(learner, tokenizer) -> tuple[int, int]:
    """(forward passes, rows through them) of the base model in one train_step on the 64-row
    contrast batch."""
    calls = []
    hook = learner.net.model.get_base_model().register_forward_hook(
        lambda module, args, kwargs, out: calls.append(len(kwargs["input_ids"])),
        with_kwargs=True)
    train_one(learner, contrast_batch(tokenizer, learner.version))
    hook.remove()
    return len(calls), sum(calls)


# one step on the whole batch, KL in the loss: the reference pass and the update's (128 rows),
# and the old log-probs' rows too when the KL shapes the rewards (the old and reference rows
# in one pass): test_one_step_update_equals_the_recomputed_old_logprobs
@pytest.mark.parametrize("keys, passes", [
    (dict(minibatch_size=64, kl_mode="loss", kl_coef=0.0), (1, 64)),  # no KL: no reference
    # two steps: the old and reference rows in one pass, then 2 updates of 32 rows
    (dict(minibatch_size=32, kl_mode="loss"), (3, 192)),
])
def test_learner_skips_redundant_passes(keys, passes, tiny_model_path, tokenizer):
    learner = make_learner("grpo", tiny_model_path, tokenizer, epochs=1, **keys)
    assert forward_rows(learner, tokenizer) == passes


def test_one_step_update_equals_the_recomputed_old_logprobs(
    tiny_model_path, tokenizer, monkeypatch,
):
    """Old log-probs from the update's own pass (the reference's 64 rows and the update's)
    give the step, KL and vLLM gap that their own rows in the reference's pass give (as when
    the KL shapes the rewards)."""
    keys = dict(epochs=1, minibatch_size=64, kl_mode="loss")
    one_step = make_learner("grpo", tiny_model_path, tokenizer, **keys)
    assert forward_rows(one_step, tokenizer) == (2, 128)
    monkeypatch.setattr(GRPOConfig, "needs_old_logp_first", property(lambda self: True))
    recomputed = make_learner("grpo", tiny_model_path, tokenizer, **keys)
    assert forward_rows(recomputed, tokenizer) == (2, 192)
    stats = []
    for learner in (one_step, recomputed):
        learner.core.policy_opt = torch.optim.SGD(learner.core.policy_params, lr=1.0)
        stats.append(train_one(learner, contrast_batch(tokenizer, learner.version)))
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(
        one_step.core.policy_params, recomputed.core.policy_params, strict=True))
    assert gap < 1e-6, gap  # measured: 0.0 (the same forward pass)
    assert stats[0].kl == pytest.approx(stats[1].kl, abs=1e-7)
    assert stats[0].logprob_diff_vllm == pytest.approx(stats[1].logprob_diff_vllm, abs=1e-7)


def test_autocast_setting():
    assert autocast_dtype("off", "cpu", "float32") is None
    assert autocast_dtype("bf16", "cpu", "float32") == "bfloat16"
    assert autocast_dtype("bf16", "cuda", "bfloat16") is None  # bfloat16 weights already
    assert autocast_dtype("auto", "cpu", "float32") == ("bfloat16" if native_bf16("cpu") else None)


def test_attention_kernel_default():
    """eager on the CPU unless model.attn_implementation says otherwise; transformers' choice
    on a GPU. The learner below is built on the CPU with no setting."""
    assert attention_kernel(None, "cpu") == "eager"
    assert attention_kernel("sdpa", "cpu") == "sdpa"
    assert attention_kernel(None, "cuda") is None


def test_bf16_autocast_learns_on_float32_weights(tiny_model_path, tokenizer):
    """bf16 matmuls in the update; the LoRA weights, their Adam moments and the probe check
    stay float32."""
    algo = algorithm("grpo").config(minibatch_size=32)
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, algo, autocast="bf16")
    assert learner.net.model.config._attn_implementation == "eager"  # the CPU default
    dtypes = set()
    layer = learner.net.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    hook = layer.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    before = margin(learner, tokenizer)  # no autocast outside an update
    for _ in range(3):
        train_one(learner, contrast_batch(tokenizer, learner.version))
    hook.remove()
    assert dtypes == {torch.float32, torch.bfloat16}
    assert {p.dtype for p in learner.core.policy_params} == {torch.float32}
    moments = [s["exp_avg"] for s in learner.core.policy_opt.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    gain = margin(learner, tokenizer) - before
    assert gain > MIN_GAIN["grpo"], gain  # measured: 3.26 at seed 0 (float32: 3.25-3.44)


def test_the_learner_names_its_precision(tiny_model_path, tokenizer):
    assert new_learner(tiny_model_path, tokenizer.pad_token_id).precision() == "float32 on cpu"
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, autocast="bf16")
    assert learner.precision() == "bfloat16 autocast on float32 weights on cpu"
