"""The memory ordering the README claims (`lorafleet bench memory`), each variant in its own
process as the benchmark runs it: seven fresh processes, each importing torch, transformers and
PEFT (about 2.5 minutes on 2 cores)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lorafleet.cluster.bench.memory import VARIANTS, BenchSetup, run_variant


@pytest.fixture(scope="module")
def wide_model_path(tmp_path_factory) -> str:
    """Weights big enough (39M params, 157 MB in float32) to stand out of the RSS noise, with a
    batch small enough that activations do not: the ordering is then the weights' and the
    optimisers' (random init, built in a second)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("bench") / "wide-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_memory_ordering_across_variants(wide_model_path):
    setup = BenchSetup(prompts=2, samples=2, prompt_tokens=8, response_tokens=8, steps=1)
    variants = [v for v in VARIANTS if v != "dpo"]
    with ThreadPoolExecutor(2) as pool:  # separate processes: peaks stay separate
        results = pool.map(lambda v: run_variant(v, wide_model_path, setup), variants)
    own = {r["variant"]: r["peak_mb"] - r["baseline_mb"] for r in results}
    # Measured here (MB): sft_lora 191, spr 197, grpo 185, ppo_lora 180, ppo_lora_rm 181,
    # rm_actor 63, ppo_full 1212.
    # PERL: three full copies and two full AdamW states cost several times the LoRA learner.
    assert own["ppo_full"] > 4 * own["ppo_lora"], own
    # SPR and GRPO train the policy adapter alone: SFT-LoRA's memory (measured 1.03x, 0.97x).
    for variant in ("spr", "grpo"):
        assert abs(own[variant] / own["sft_lora"] - 1) < 0.25, own
    # The reward adapter on the learner's base costs less than a reward actor's own base
    # (measured 1 MB over ppo_lora, against 63 MB for the actor).
    assert own["ppo_lora_rm"] < own["ppo_lora"] + own["rm_actor"], own
