"""In-memory LoRA hot-swap on a real vLLM engine, checked against the learner and vLLM's own
disk loader; stale or silently failed swaps must be detected. On both tiny architectures:
Llama, and Qwen2 (bias on q/k/v, which vLLM packs as qkv_proj)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from helpers import perturb_policy, perturbed_learner
from lorafleet.common.config import LoRAConfig
from lorafleet.common.data import encode_prompts
from lorafleet.common.records import GenerationRequest, Prompt, ScoredRollout
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.common.tasks.base import TaskExample
from lorafleet.learner.actor import train_one
from lorafleet.learner.core import SyncError
from lorafleet.learner.rl import run_passes
from lorafleet.rollout.worker import POLICY, AdapterMissing


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_path(request, tiny_model_path) -> str:
    if request.param == "llama":
        return tiny_model_path
    from helpers import QWEN2_ADDITION
    from lorafleet.common.tiny_model import build_tiny_model

    return str(build_tiny_model(AdditionTask(), QWEN2_ADDITION))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def engine(model_path):
    from lorafleet.common.specs import EngineSpec
    from lorafleet.rollout.worker import RolloutWorker

    # the LoRA modules named (the LM head left unwrapped): prompt log-probs under a LoRA
    worker = RolloutWorker(EngineSpec(
        model_path, max_model_len=128, dtype="float32", max_lora_rank=8, seed=0,
        threads_per_worker=2, max_loras=2, lora_target_modules=tuple(
            LoRAConfig().target_modules)))
    yield worker
    del worker  # frees the engine's KV cache before the other architecture's starts


@pytest.fixture(scope="module")
def prompts(tokenizer):
    examples = AdditionTask().examples("eval")[:32]
    return [Prompt(i, e.prompt, tokenizer(e.prompt).input_ids, {"reference": e.answer})
            for i, e in enumerate(examples)]


def sample(engine, prompts, **kwargs):
    return engine.generate(prompts, n=4, temperature=1.0, max_tokens=6, seed=11, **kwargs)


def test_swap_changes_outputs_and_equals_disk_load(
    engine, prompts, tokenizer, tmp_path, model_path
):
    # lora_B ~ N(0, 0.2^2): the shipped model is sharp (its first answer token is near certain),
    # so a smaller perturbation moves few sampled tokens.
    learner = perturbed_learner(model_path, tokenizer.pad_token_id, scale=0.2)
    snapshot = learner.publish()
    base = sample(engine, prompts, use_policy=False)

    engine.load_snapshot(snapshot)
    assert engine.adapter_version == snapshot.version == 0
    # swapped in memory: the request vLLM serves (below) names no directory it could read
    served = engine.served[POLICY][0]
    assert served.lora_path == "mem://policy/v0" and not Path(served.lora_path).exists()
    snapshot.verify()  # vLLM scales lora_B in place: the published tensors must be untouched
    swapped = sample(engine, prompts)
    assert all(r.adapter_version == 0 for r in swapped)
    pairs = list(zip(base, swapped, strict=True))
    # Same seeds: a sample's tokens change where the adapter moved the distribution enough,
    # its first log-prob almost everywhere. Measured over perturbation seeds 0-3, with 2
    # threads and with 1 thread + ATEN_CPU_CAPABILITY=avx2 (the same counts): 35-57 of 128
    # token sequences, 124-128 of 128 first log-probs; Qwen2 (seed 0): 55 and 126 of 128.
    tokens_changed = sum(a.response_ids != b.response_ids for a, b in pairs)
    logprobs_changed = sum(abs(a.logprobs[0] - b.logprobs[0]) > 1e-3 for a, b in pairs)
    assert tokens_changed >= len(pairs) // 8, f"{tokens_changed}/{len(pairs)} samples changed"
    assert logprobs_changed >= 0.75 * len(pairs), f"{logprobs_changed}/{len(pairs)} changed"

    from_disk = sample(engine, prompts, lora=engine.lora_from_disk(
        snapshot.save_pretrained(tmp_path / "adapter")))
    assert [r.response_ids for r in from_disk] == [r.response_ids for r in swapped]
    worst = max(
        abs(x - y)
        for a, b in zip(from_disk, swapped, strict=True)
        for x, y in zip(a.logprobs, b.logprobs, strict=True)
    )
    assert worst < 1e-5

    # The learner agrees with what the engine serves, token by token.
    probe = engine.probe([p.token_ids for p in prompts[:8]], max_tokens=6)
    assert learner.check_probe([probe], tolerance=1e-3) < 1e-3


def test_stale_and_silent_noop_swaps_are_detected(engine, prompts, tokenizer, model_path):
    learner = perturbed_learner(model_path, tokenizer.pad_token_id, seed=3)
    engine.load_snapshot(learner.publish())  # worker serves v0
    stale_probe = engine.probe([p.token_ids for p in prompts[:8]], max_tokens=6)

    perturb_policy(learner, seed=99)  # the learner moves on to new weights...
    learner.core.version = 1
    v1 = learner.publish()
    # ...a worker that never received v1 reports v0: a version mismatch.
    with pytest.raises(SyncError, match="reports adapter v0, learner published v1"):
        learner.check_probe([stale_probe], tolerance=1e-3)
    # A worker that claims v1 but still serves v0's weights (a silent no-op swap) is caught by
    # its log-probs, not trusted for its label.
    relabelled = type(stale_probe)(**{**vars(stale_probe), "adapter_version": 1})
    with pytest.raises(SyncError, match="swap did not take effect"):
        learner.check_probe([relabelled], tolerance=1e-3)
    # After the real swap the check passes.
    engine.load_snapshot(v1)
    learner.check_probe([engine.probe([p.token_ids for p in prompts[:8]], 6)], tolerance=1e-3)

    # Rollouts from an old adapter are refused by the learner's update.
    old = sample(engine, prompts[:2])
    learner.core.version = 2
    from lorafleet.common.records import ScoredRollout

    with pytest.raises(SyncError, match="stale"):
        train_one(learner, [ScoredRollout(r, 1.0) for r in old])


def test_chat_prompts_train_on_the_ids_vllm_generated_from(engine, tokenizer, model_path):
    """A user's conversational prompts, rendered by a chat template (model.chat_template): the
    learner scores vLLM's samples on the Prompt's token ids and gets vLLM's own log-probs, so
    it trains on exactly the ids vLLM generated from."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    examples = [TaskExample(e.prompt, "", conversation=[
        {"role": "system", "content": "add"}, {"role": "user", "content": e.prompt}
    ], columns={"solution": e.answer}) for e in AdditionTask().examples("eval")[:16]]
    prompts = encode_prompts(examples, chat, 100)
    assert prompts[0].text.startswith("system: add\nuser: ")
    learner = perturbed_learner(model_path, tokenizer.pad_token_id, scale=0.2)
    engine.load_snapshot(learner.publish())
    rollouts = sample(engine, prompts)
    ctx = learner.rl.prepare([ScoredRollout(r, 0.0) for r in rollouts], 0)
    run_passes([(learner.rl, ctx)])
    gap = ctx.logprob_gap
    # mean |learner - vLLM| log-prob over the 64 samples' tokens: measured 1.1e-6 (float32)
    assert gap < 1e-4, gap


def test_stop_ids_and_strings_end_samples(engine, prompts):
    """rollout.stop_token_ids / rollout.stop: a sample ends at the token (kept in its ids) or
    the string (cut from the text the rewards see)."""
    def greedy(**stop):
        return engine.generate(prompts[:4], n=1, temperature=0.0, max_tokens=6, seed=0,
                               use_policy=False, **stop)

    free = greedy()  # two-digit sums, e.g. "45"
    first = free[0].response_ids[0]
    by_id = greedy(stop_token_ids=[first])[0]
    assert (by_id.response_ids, by_id.response_text, by_id.finish_reason) == ([first], "", "stop")
    stop = free[0].response_text[1]
    by_string = greedy(stop=[stop])
    assert by_string[0].response_text == free[0].response_text[0]
    assert all(stop not in r.response_text and r.finish_reason == "stop" for r in by_string)


def test_one_call_mixes_the_adapters_of_two_slots(engine, prompts, tokenizer, model_path,
                                                  tmp_path):
    """Two policies' adapters in the two slots of one engine (max_loras=2): one
    generate_requests call samples both, as vLLM batches across adapters, and each slot's
    greedy samples equal those of a call of its own, tagged with the slot and its version."""
    learner = perturbed_learner(model_path, tokenizer.pad_token_id, scale=0.2)
    first = learner.publish()
    perturb_policy(learner, seed=7, scale=0.2)
    learner.core.version = 1
    second = learner.publish()
    engine.load_snapshot(first)
    engine.load_snapshot(second, "other")
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 6, "seed": 0}
    alone = {slot: engine.generate(prompts[:16], slot=slot, **greedy)
             for slot in (POLICY, "other")}
    mixed = dict(zip((POLICY, "other"), engine.generate_requests(
        [GenerationRequest(slot, prompts[:16], **greedy) for slot in (POLICY, "other")]),
        strict=True))
    for slot, version in ((POLICY, 0), ("other", 1)):
        assert [r.response_ids for r in mixed[slot]] == [r.response_ids for r in alone[slot]]
        assert max(abs(x - y) for a, b in zip(mixed[slot], alone[slot], strict=True)
                   for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
        assert {(r.policy, r.adapter_version) for r in mixed[slot]} == {(slot, version)}
    # the two adapters score their samples apart: equal log-probs above are each slot's own
    assert sum(abs(a.logprobs[0] - b.logprobs[0]) > 1e-3
               for a, b in zip(alone[POLICY], alone["other"], strict=True)) >= 12

    # Adapters read from disk beside the full slots replace each other in vLLM's cache, never
    # a slot's (which it could not read back).
    directory = first.save_pretrained(tmp_path / "adapter")
    for _ in range(2):
        engine.generate(prompts[:2], lora=engine.lora_from_disk(directory), **greedy)
    again = engine.generate_requests(
        [GenerationRequest(slot, prompts[:16], **greedy) for slot in (POLICY, "other")])
    assert [[r.response_ids for r in rollouts] for rollouts in again] == [
        [r.response_ids for r in alone[slot]] for slot in (POLICY, "other")]

    with pytest.raises(ValueError, match=r"at most max_loras=2 adapters .* slot 'third'"):
        engine.load_snapshot(first, "third")
    with pytest.raises(AdapterMissing, match="no adapter in slot 'third'"):
        engine.generate_requests([GenerationRequest("third", prompts[:2], **greedy)])

    # a dropped slot frees its place for another adapter and serves nothing any more
    engine.drop_slot("other")
    engine.load_snapshot(second, "third")
    third = engine.generate_requests([GenerationRequest("third", prompts[:16], **greedy)])[0]
    assert [r.response_ids for r in third] == [r.response_ids for r in alone["other"]]
    with pytest.raises(AdapterMissing, match="no adapter in slot 'other'"):
        engine.generate_requests([GenerationRequest("other", prompts[:2], **greedy)])


def test_prompt_logprobs_score_the_sampled_tokens(engine, prompts, tokenizer, model_path):
    """A sample's log-probs equal the prompt log-probs of prompt + sample under the same
    adapter (what the Tinker API's compute_logprobs returns); slot None samples the base."""
    learner = perturbed_learner(model_path, tokenizer.pad_token_id, scale=0.2)
    engine.load_snapshot(learner.publish())
    sampled = engine.generate_requests([GenerationRequest(
        POLICY, prompts[:8], n=2, temperature=1.0, max_tokens=6, seed=3)])[0]
    scored = engine.generate_requests([GenerationRequest(
        POLICY, [Prompt(i, "", r.prompt.token_ids + r.response_ids, {})
                 for i, r in enumerate(sampled)], n=1, temperature=1.0, max_tokens=1, seed=0,
        prompt_logprobs=True)])[0]
    for rollout, score in zip(sampled, scored, strict=True):
        assert math.isnan(score.prompt_logprobs[0])
        assert score.prompt_logprobs[len(rollout.prompt.token_ids):] == pytest.approx(
            rollout.logprobs, abs=1e-5)
    base = engine.generate_requests([GenerationRequest(
        None, prompts[:8], n=1, temperature=0.0, max_tokens=6, seed=0)])[0]
    assert {r.adapter_version for r in base} == {-1}
    assert [r.response_ids for r in base] == [
        r.response_ids for r in engine.generate(prompts[:8], n=1, temperature=0.0,
                                                max_tokens=6, seed=0, use_policy=False)]
