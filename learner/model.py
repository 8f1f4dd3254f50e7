"""One base model, several LoRA adapters (PERL's memory trick).

- policy    = base + LoRA "policy"
- reference = the same base with every adapter disabled (no second model copy)
- value     = base + LoRA "value" + a scalar head on its last hidden state (PPO only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from ..common.records import AdapterSnapshot, ScoredRollout

POLICY, VALUE = "policy", "value"


@dataclass
class TokenBatch:
    """Prompt+response rows, right-padded. Response tensors are [B, T] over response tokens;
    `positions[b, k]` is the index in `input_ids` of the logits that predict response token k."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    positions: Tensor  # [B, T]
    response_ids: Tensor  # [B, T]
    mask: Tensor  # [B, T] float, 1.0 on real response tokens

    def select(self, rows: Tensor) -> TokenBatch:
        return TokenBatch(*(t[rows] for t in (
            self.input_ids, self.attention_mask, self.positions, self.response_ids, self.mask
        )))


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> TokenBatch:
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("a response has no tokens; the learner needs at least one per sample")
    rows = len(prompt_ids)
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    t_max = max(len(r) for r in response_ids)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, t_max), dtype=torch.long)
    responses = torch.full((rows, t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, t_max))
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        attention[b, : len(p) + len(r)] = 1
        positions[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        responses[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1.0
    return TokenBatch(input_ids, attention, positions, responses, mask)


def collate_scored(scored: list[ScoredRollout], pad_id: int) -> TokenBatch:
    return collate(
        [s.rollout.prompt.token_ids for s in scored], [s.rollout.response_ids for s in scored],
        pad_id,
    )


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """x: [B, L, ...] -> [B, T, ...] at the response positions."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(
        -1, -1, *x.shape[2:]
    )
    return x.gather(1, index)


def _jsonable(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"not JSON serialisable: {value!r}")


class PolicyValueModel:
    def __init__(
        self, model_path: str, lora: object, dtype: torch.dtype, seed: int, with_value: bool
    ) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        base.config.use_cache = False
        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config, adapter_name=POLICY)
        self.value_head: torch.nn.Linear | None = None
        if with_value:  # critic-free algorithms carry no value adapter at all (memory)
            self.model.add_adapter(VALUE, config)
            self.value_head = torch.nn.Linear(base.config.hidden_size, 1, dtype=dtype)
            # Small non-zero weights: a zero head would block the value LoRA's first gradients.
            torch.nn.init.normal_(self.value_head.weight, std=1 / (base.config.hidden_size + 1))
            torch.nn.init.zeros_(self.value_head.bias)
        self.model.eval()  # no dropout by default; lora.dropout still applies via train()

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        if name == VALUE:
            params += list(self.value_head.parameters())
        return params

    def _decoder(self):
        base = self.model.get_base_model()
        return getattr(base, base.base_model_prefix)

    def logprobs(self, batch: TokenBatch, with_entropy: bool = False):
        """Log-probs of the response tokens under the active policy adapter ([B, T])."""
        self.model.set_adapter(POLICY)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return token_logprobs(logits, batch, with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> Tensor:
        with self.model.disable_adapter():
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits
        return token_logprobs(logits, batch, False)

    def values(self, batch: TokenBatch) -> Tensor:
        """V(state before response token k) from the value adapter + head ([B, T])."""
        # set_adapter also makes only the active adapter trainable, so each forward activates
        # its own adapter and leaves it active until its backward has run.
        self.model.set_adapter(VALUE)
        hidden = self._decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        return self.value_head(gather_positions(hidden, batch.positions)).squeeze(-1)

    def snapshot(self, name: str, version: int) -> AdapterSnapshot:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(self.model, adapter_name=name)
        config = json.loads(json.dumps(self.model.peft_config[name].to_dict(), default=_jsonable))
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        return AdapterSnapshot(version=version, peft_config=config, tensors=tensors)


def token_logprobs(logits: Tensor, batch: TokenBatch, with_entropy: bool):
    picked = gather_positions(logits, batch.positions).float()  # [B, T, V]
    log_probs = torch.log_softmax(picked, dim=-1)
    token_logp = log_probs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy
