"""The learner's saved adapter is plain PEFT: PeftModel.from_pretrained reproduces its logprobs."""

from __future__ import annotations

import torch

from helpers import perturbed_learner
from lorafleet.learner.model import collate


def test_saved_adapter_loads_with_peft_and_matches(tiny_model_path, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = perturbed_learner(tiny_model_path, tokenizer.pad_token_id)
    out = learner.save(str(tmp_path / "adapter"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "value",
    ]
    assert (tmp_path / "adapter" / "value" / "value_head.safetensors").exists()

    prompts = [tokenizer(t).input_ids for t in ("12+7=", "3+45=", "40+40=")]
    responses = [tokenizer(t, add_special_tokens=False).input_ids for t in ("19", "48", "80")]
    batch = collate(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = learner.net.logprobs(batch)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, out).eval()
        logits = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = torch.log_softmax(
            logits.gather(1, batch.positions[..., None].expand(-1, -1, logits.shape[-1])), -1
        )
        theirs = picked.gather(-1, batch.response_ids[..., None]).squeeze(-1)
        with loaded.disable_adapter():
            plain = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(theirs * batch.mask, ours * batch.mask, atol=1e-5, rtol=0)
    # ...and the adapter matters: the adapter-off model scores differently.
    assert not torch.allclose(plain, logits, atol=1e-3)
