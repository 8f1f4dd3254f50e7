"""One base model, several LoRA adapters (PERL's memory trick).

- policy    = base + LoRA "policy" (or one LoRA per policy, named after it, when a run trains
              several)
- reference = the same base with every adapter disabled (no second model copy)
- value     = base + LoRA "value" + a scalar head on its last hidden state (PPO only; one per
              policy, `value_adapter`)
- reward    = base + LoRA "reward" + a scalar head on the last token (a learned reward model,
              trained here or loaded; PERL's option of keeping it on the learner's base)
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from ..common.devices import attention_kernel
from ..common.records import POLICY, AdapterSnapshot, ScoredRollout
from .routing import Route, Router

# Ray warns on every zero-copy tensor it serialises; snapshot() below hands it detached clones.
warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")

# model.dtype -> torch dtype, for the learner and for reward actors that rebuild a reward model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

VALUE, REWARD = "value", "reward"


def value_adapter(policy: str) -> str:
    """Policy `policy`'s value adapter: `value` for the run's one policy, `<policy>-value` for
    each of several (no policy name ends in -value)."""
    return VALUE if policy == POLICY else f"{policy}-{VALUE}"


def head_kind(adapter: str) -> str | None:
    """The scalar head an adapter is read through, VALUE or REWARD; None: the LM head."""
    if adapter == REWARD:
        return REWARD
    return VALUE if adapter == VALUE or adapter.endswith(f"-{VALUE}") else None


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
        return TokenBatch(*(t[rows] for t in self._tensors()))

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return self.input_ids, self.attention_mask, self.positions, self.response_ids, self.mask


def collate(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
    device: torch.device | str = "cpu",
) -> TokenBatch:
    """Built on the CPU row by row, then moved to `device` in one copy per tensor."""
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
    return TokenBatch(input_ids, attention, positions, responses, mask).to(device)


def collate_scored(
    scored: list[ScoredRollout], pad_id: int, device: torch.device | str = "cpu"
) -> TokenBatch:
    return collate(
        [s.rollout.prompt.token_ids for s in scored], [s.rollout.response_ids for s in scored],
        pad_id, device,
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
    """The base model with the named LoRA adapters; `value` and `reward` carry a scalar head.
    Everything lives on `device`; batches must be collated onto it (`collate(..., net.device)`)."""

    def __init__(
        self, model_path: str, lora: object, dtype: torch.dtype, seed: int,
        adapters: tuple[str, ...] = (POLICY,), device: torch.device | str = "cpu",
        attn_implementation: str | None = None, gradient_checkpointing: bool = False,
        base: torch.nn.Module | None = None,
    ) -> None:
        """`base`: the base model as `release_base` gave it back, in place of loading it
        (loading draws nothing from torch's generator: the adapters are drawn the same)."""
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        if base is None:
            kernel = attention_kernel(attn_implementation, torch.device(device).type)
            attention = {"attn_implementation": kernel} if kernel else {}
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **attention)
            base.config.use_cache = False
        self.router = Router()
        if gradient_checkpointing:
            # non-reentrant: the frozen base's inputs need no grad for the LoRA grads to flow;
            # a layer recomputed in the backward pass goes through its forward pass's route
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False, "context_fn": self.router.checkpoint_contexts})
            # transformers checkpoints a layer only in training mode: flag the layers alone
            # (below), so their dropout stays off as everywhere else
        self.checkpointed = [m for m in base.modules()
                             if getattr(m, "gradient_checkpointing", False)]
        self.module_names = {part for key, _ in base.named_modules() for part in key.split(".")}
        self.dtype, self.device = dtype, torch.device(device)
        base.to(self.device)
        self.check_adapter_name(adapters[0])
        self.model = get_peft_model(base, lora_config(lora), adapter_name=adapters[0])
        self.router.install(self.model)
        self.heads: dict[str, torch.nn.Linear] = {}
        self._add_head(adapters[0])
        for name in adapters[1:]:  # critic-free algorithms carry no value adapter (memory)
            self.add_adapter(name, lora)
        self.eval()

    def release_base(self) -> torch.nn.Module:
        """The base model without its adapters (PEFT's LoRA layers replaced by the linears
        they wrap, unmerged: the base weights as loaded); this model is unusable after."""
        base = self.model.unload()
        self.heads.clear()
        return base

    def compile(self) -> None:
        """The model's forward passes compiled (torch.compile, shapes dynamic: batches differ
        in length); each adapter setting compiles once, on its first pass."""
        self.model.forward = torch.compile(self.model.forward, dynamic=True)

    def eval(self) -> None:
        """Every module in eval mode, no dropout (lora.dropout still applies via train()), but
        for the training flag of the checkpointed layers (`__init__`)."""
        self.model.eval()
        for layer in self.checkpointed:
            layer.training = True

    def check_adapter_name(self, name: str) -> None:
        """PEFT tells the adapters' tensors apart by the name between dots, and finds its own
        by `lora_` in theirs: a name that is also a module's (a layer's index, `mlp`; PEFT's
        `lora_A`, `base_layer`) or part of `lora_` mixes them up."""
        peft_names = name in "lora_" or name.startswith("lora_") or name == "base_layer"
        if name in self.module_names or peft_names:
            raise ValueError(f"adapter name {name!r} is also the name of a module of the "
                             "model or part of PEFT's, which PEFT would confuse; rename it")

    def add_adapter(self, name: str, lora: object) -> None:
        self.check_adapter_name(name)
        self.model.add_adapter(name, lora_config(lora))
        self.router.install(self.model)
        self._add_head(name)

    def remove_adapter(self, name: str) -> None:
        """Adapter `name` (and its head) off the model; its tensors go with the last
        reference to them."""
        with warnings.catch_warnings():
            # PEFT warns that it activates another adapter in place of a deleted active one;
            # every forward here names its adapter (`active`), so which one that is does not
            # matter
            warnings.filterwarnings("ignore", message=f"Adapter {re.escape(name)} was active")
            self.model.delete_adapter(name)
        self.heads.pop(name, None)

    def _add_head(self, name: str) -> None:
        kind = head_kind(name)
        if kind is None:
            return
        hidden = self.model.get_base_model().config.hidden_size
        head = torch.nn.Linear(hidden, 1, dtype=self.dtype, device=self.device)
        if kind == VALUE:
            # Small non-zero weights: near-zero values to start from, but not a zero head,
            # which would block the value LoRA's first gradients. A reward head keeps
            # Linear's default init: a near-zero one left Bradley-Terry stuck at log 2.
            torch.nn.init.normal_(head.weight, std=1 / (hidden + 1))
            torch.nn.init.zeros_(head.bias)
        self.heads[name] = head

    @property
    def value_head(self) -> torch.nn.Linear | None:
        return self.heads.get(VALUE)

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        if name in self.heads:
            params += list(self.heads[name].parameters())
        return params

    def _decoder(self):
        base = self.model.get_base_model()
        return getattr(base, base.base_model_prefix)

    def routed(self, adapters: str | list[str] | Route, rows: int) -> AbstractContextManager:
        """The context of one forward pass of `rows` rows, each through its adapters: a name,
        names whose updates are summed ([]: none, the base model; the meet stage), or a
        `Route` giving each run of rows its own (several adapters in one pass)."""
        route = adapters if isinstance(adapters, Route) else Route.whole(adapters, rows)
        return self.router.routed(route)

    def logprobs(
        self, batch: TokenBatch, with_entropy: bool = False,
        adapters: str | list[str] | Route = POLICY,
    ):
        """Log-probs of the response tokens under the policy adapter, or under `adapters`
        (`routed`) ([B, T])."""
        with self.routed(adapters, len(batch.input_ids)):
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits
        return token_logprobs(logits, batch, with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> Tensor:
        return self.logprobs(batch, adapters=[])  # every adapter off: the base model

    def head_states(self, input_ids: Tensor, attention_mask: Tensor,
                    adapters: str | Route) -> tuple[Tensor, list[tuple[str, int, int]]]:
        """The decoder's last hidden states [B, L, H] under scalar-head adapters (a name, or a
        Route of one per run), and each run's head adapter with its rows."""
        route = adapters if isinstance(adapters, Route) else Route.whole(adapters,
                                                                          len(input_ids))
        with self.router.routed(route):
            hidden = self._decoder()(input_ids=input_ids,
                                     attention_mask=attention_mask).last_hidden_state
        return hidden, [(names[0], start, end) for names, start, end in route.spans()]

    def through_heads(self, states: Tensor, runs: list[tuple[str, int, int]]) -> Tensor:
        """Each run's rows of `states` ([B, ..., H]) through its adapter's scalar head."""
        out = [self.heads[name](states[start:end]).squeeze(-1) for name, start, end in runs]
        return out[0] if len(out) == 1 else torch.cat(out)

    def values(self, batch: TokenBatch, adapters: str | Route = VALUE) -> Tensor:
        """V(state before response token k) from value adapter `adapters` + its head, or one
        per run of a Route ([B, T])."""
        hidden, runs = self.head_states(batch.input_ids, batch.attention_mask, adapters)
        return self.through_heads(gather_positions(hidden, batch.positions), runs)

    def scores(self, input_ids: Tensor, attention_mask: Tensor,
               adapters: str | Route = REWARD) -> Tensor:
        """A scalar-head adapter's score of each whole right-padded row: the head on the hidden
        state of the row's last token ([B], on the model's device)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden, runs = self.head_states(input_ids, attention_mask, adapters)
        last = attention_mask.sum(-1) - 1
        rows = torch.arange(len(last), device=self.device)
        return self.through_heads(hidden[rows, last], runs)

    def snapshot(self, name: str, version: int) -> AdapterSnapshot:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(self.model, adapter_name=name)
        config = json.loads(json.dumps(self.model.peft_config[name].to_dict(), default=_jsonable))
        # CPU copies: what Ray ships and PEFT saves, whatever device the learner trains on
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        return AdapterSnapshot(version=version, peft_config=config, tensors=tensors)


def lora_config(lora: object):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )


def head_file(directory: Path, name: str) -> Path:
    """Adapter `name`'s scalar head, named after its kind (a policy's value head is
    `value_head`, whatever the policy's name)."""
    return directory / f"{head_kind(name)}_head.safetensors"


def save_adapter(net: PolicyValueModel, name: str, version: int, directory: Path) -> Path:
    """One adapter in PEFT format at `directory`, plus its scalar head if it has one."""
    from safetensors.torch import save_file

    net.snapshot(name, version).save_pretrained(directory)
    if name in net.heads:
        state = {k: v.detach().contiguous() for k, v in net.heads[name].state_dict().items()}
        save_file(state, head_file(directory, name))
    return directory


def check_adapter_fits(net: PolicyValueModel, name: str, directory: Path, label: str) -> None:
    """A ValueError naming each LoRA setting (rank, alpha, target modules) in which the
    adapter saved at `directory` differs from the model's adapter `name` (`label`: what the
    message calls it, its policy's name)."""
    saved = json.loads((directory / "adapter_config.json").read_text())
    ours = net.model.peft_config[name]
    settings = {"rank": ("r", ours.r), "alpha": ("lora_alpha", ours.lora_alpha),
                "target modules": ("target_modules", ours.target_modules)}
    differ = []
    for setting, (key, value) in settings.items():
        theirs = saved.get(key)
        if isinstance(value, set | list | tuple):
            value, theirs = sorted(value), sorted(theirs or [])
        if theirs != value:
            differ.append(f"{setting} {theirs} (the adapter's: {value})")
    if differ:
        raise ValueError(f"{directory} does not fit adapter {label!r}: it has "
                         f"{'; '.join(differ)}")


def load_adapter(net: PolicyValueModel, name: str, directory: Path) -> None:
    """Load a `save_adapter` directory into the model's adapter `name` (and its head)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(
        net.model, load_file(directory / "adapter_model.safetensors"), adapter_name=name
    )
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing:
        raise ValueError(f"{directory}: adapter {name!r} lacks {missing[:3]}")
    if name in net.heads:
        net.heads[name].load_state_dict(load_file(head_file(directory, name)))


def token_logprobs(logits: Tensor, batch: TokenBatch, with_entropy: bool):
    picked = gather_positions(logits, batch.positions).float()  # [B, T, V]
    log_probs = torch.log_softmax(picked, dim=-1)
    token_logp = log_probs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy
