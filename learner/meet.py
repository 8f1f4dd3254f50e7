"""The meet stage on the learner actor (MEET: alignment as controllable generation).

A level's control (`Controls`, one per quality level) conditions the model beside `shared`,
the policy LoRA that stage 2 trains with the controls. Three kinds (meet.control):
- `lora`: adapters `control0` .. `control{K-1}`; level k is control k and `shared` together.
- `prompt`: a soft prompt per level, trained embeddings put before the prompt's tokens.
- `text`: Chain of Hindsight; the control text is already in the prompt, nothing to train.

A response of level k trains under its control (stage 1) or its control and `shared` (stage 2).
Level k is served as one LoRA (`Controls.served_lora`: a LoRA control side by side with the
shared LoRA, or the shared LoRA alone) plus its soft prompt, if any (`publish_level`); each
worker's copy is verified by the probe against the learner's own control + shared
(`level_logprobs`). The policy the later stages continue from is the best level's served LoRA
(`use_level`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..common.records import AdapterSnapshot, OfflineStats, SFTExample
from .core import LearnerCore
from .model import PolicyValueModel, TokenBatch, token_logprobs
from .routing import Route

SHARED = "shared"


def control_name(level: int) -> str:
    return f"control{level}"


def side_by_side(
    first: dict[str, Tensor], first_scale: float, second: dict[str, Tensor], second_scale: float
) -> dict[str, Tensor]:
    """One LoRA of scale 1 whose update B @ A is s1 B1 @ A1 + s2 B2 @ A2: the A matrices'
    rows stacked, the B matrices' columns stacked with the scales folded in (PEFT names)."""
    out = {}
    for key, a in first.items():
        if ".lora_A." in key:
            out[key] = torch.cat([a, second[key]], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([a * first_scale, second[key] * second_scale], dim=1)
        else:
            raise ValueError(f"side_by_side combines LoRA A/B matrices only, got {key}")
    return out


def lora_of(net: PolicyValueModel, name: str) -> tuple[dict[str, Tensor], float, int]:
    """Adapter `name`'s tensors (PEFT names), its scale alpha / r and its rank."""
    from peft import get_peft_model_state_dict

    config = net.model.peft_config[name]
    return (get_peft_model_state_dict(net.model, adapter_name=name),
            config.lora_alpha / config.r, config.r)


def prefixed_logprobs(net: PolicyValueModel, batch: TokenBatch, route: Route,
                      prefix: Tensor) -> Tensor:
    """Response log-probs under `route`'s adapters with the `prefix` embeddings ([B, P,
    hidden], soft prompts) before each row's ([B, T])."""
    rows, length = len(batch.input_ids), prefix.shape[1]
    with net.routed(route, rows):
        embeds = net.model.get_input_embeddings()(batch.input_ids)
        embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([batch.attention_mask.new_ones(rows, length), batch.attention_mask],
                         dim=1)
        logits = net.model(inputs_embeds=embeds, attention_mask=mask).logits
    # the prefix comes first: every response position moves past it
    return token_logprobs(logits, replace(batch, positions=batch.positions + length), False)


class Controls:
    """Text controls, and the base of the trained ones: what conditions level k besides
    `shared` (adapters, embeddings before the prompt), what trains in stage 1, and level k's
    served LoRA at scale 1 with its rank."""

    def __init__(self, net: PolicyValueModel, levels: int) -> None:
        self.net, self.levels = net, levels

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def adapters(self, level: int) -> list[str]:
        return []

    def soft_prompt(self, level: int) -> Tensor | None:
        return None

    def served_lora(self, level: int) -> tuple[dict[str, Tensor], int]:
        tensors, scale, rank = lora_of(self.net, SHARED)
        return {k: v * scale if ".lora_B." in k else v for k, v in tensors.items()}, rank


class LoRAControls(Controls):
    """One LoRA of `rank` per level; served side by side with the shared LoRA."""

    def __init__(self, net: PolicyValueModel, levels: int, rank: int, lora: object) -> None:
        super().__init__(net, levels)
        for level in range(levels):
            net.add_adapter(control_name(level), replace(lora, rank=rank))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for k in range(self.levels)
                for p in self.net.adapter_parameters(control_name(k))]

    def adapters(self, level: int) -> list[str]:
        return [control_name(level)]

    def served_lora(self, level: int) -> tuple[dict[str, Tensor], int]:
        control, control_scale, control_rank = lora_of(self.net, control_name(level))
        shared, shared_scale, shared_rank = lora_of(self.net, SHARED)
        return (side_by_side(control, control_scale, shared, shared_scale),
                control_rank + shared_rank)


class PromptControls(Controls):
    """One soft prompt of `length` embeddings per level (prompt tuning), each started from the
    embeddings of `length` tokens drawn from the vocabulary (the learner's seed)."""

    def __init__(self, net: PolicyValueModel, levels: int, length: int) -> None:
        super().__init__(net, levels)
        table = net.model.get_input_embeddings().weight
        tokens = torch.randint(0, len(table), (levels, length)).to(table.device)
        self.embeddings = torch.nn.Parameter(table.detach()[tokens].float().clone())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.embeddings]

    def soft_prompt(self, level: int) -> Tensor:
        return self.embeddings[level]


class MeetUpdater:
    """The meet stage on the learner: K controls of one kind and the shared policy LoRA,
    created when the stage starts; each phase trains with its own optimiser."""

    def __init__(self, core: LearnerCore, lora: object, control: str, levels: int,
                 size: int) -> None:
        """K fresh controls of `control` kind (`size`: a LoRA's rank or a soft prompt's
        length) and the fresh shared policy LoRA."""
        self.core, self.lora = core, lora
        self.controls = {
            "lora": lambda: LoRAControls(core.net, levels, size, lora),
            "prompt": lambda: PromptControls(core.net, levels, size),
            "text": lambda: Controls(core.net, levels),
        }[control]()
        core.net.add_adapter(SHARED, lora)
        # what the phase trains (start_phase)
        self.with_shared = False
        self.params: list[torch.nn.Parameter] = []
        self.opt: torch.optim.Optimizer | None = None

    def start_phase(self, lr: float, with_shared: bool) -> None:
        """Stage 1 (controls alone) or stage 2 (controls and the shared LoRA): a fresh
        optimiser over what the phase trains."""
        self.with_shared = with_shared
        shared = self.core.net.adapter_parameters(SHARED) if with_shared else []
        self.params = self.controls.parameters() + shared
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0)

    def level_logprobs(self, batch, level: int, with_shared: bool = True) -> Tensor:
        """Response log-probs under level `level`'s control (and the shared LoRA)."""
        return self.levels_logprobs(batch, [(level, len(batch.input_ids))], with_shared)

    def levels_logprobs(self, batch, runs: list[tuple[int, int]], with_shared: bool) -> Tensor:
        """Response log-probs of rows in runs of one level each, `(level, rows)` in row order,
        each under its level's control (and the shared LoRA), in one forward pass."""
        route = Route.of([(self.controls.adapters(level) + [SHARED] * with_shared, rows)
                          for level, rows in runs])
        prompts = [self.controls.soft_prompt(level) for level, _ in runs]
        if prompts[0] is None:
            return self.core.net.logprobs(batch, adapters=route)
        prefix = torch.cat([p.expand(rows, -1, -1) for p, (_, rows) in zip(prompts, runs,
                                                                             strict=True)])
        return prefixed_logprobs(self.core.net, batch, route, prefix)

    def step(self, examples: list[SFTExample], version: int) -> OfflineStats:
        """The SFT token loss over the minibatch, each row under its own level's control: the
        rows ordered by level, all levels in one forward pass (the loss is a mean over
        tokens, so the order is the minibatch's own)."""
        core = self.core
        examples = sorted(examples, key=lambda e: e.level)
        batch = core.collate([e.prompt_ids for e in examples], [e.response_ids for e in examples])
        levels = [e.level for e in examples]
        runs = [(level, levels.count(level)) for level in sorted(set(levels))]
        with core.autocast():
            logp = self.levels_logprobs(batch, runs, self.with_shared).float()
        return core.nll_step(batch, logp, self.params, self.opt, version)

    def publish_level(self, level: int, policy: AdapterSnapshot) -> AdapterSnapshot:
        """Level `level`'s served LoRA and soft prompt, for a rollout worker to hold beside the
        policy (`policy`: the policy's snapshot; the level carries its version, which is what
        the controls are at now, and its LoRA settings but the rank)."""
        tensors, rank = self.controls.served_lora(level)
        config = {**policy.peft_config, "r": rank, "lora_alpha": float(rank)}
        soft_prompt = self.controls.soft_prompt(level)
        return AdapterSnapshot(
            version=policy.version, peft_config=config,
            tensors={k: v.detach().to("cpu", copy=True) for k, v in tensors.items()},
            soft_prompt=None if soft_prompt is None else soft_prompt.detach().to("cpu", copy=True),
        )

    @torch.no_grad()
    def use_level(self, level: int) -> None:
        """Make the policy adapter level `level`'s served LoRA (the later stages continue from
        it)."""
        from peft import set_peft_model_state_dict

        net, policy = self.core.net, self.core.adapter
        tensors, rank = self.controls.served_lora(level)
        config = net.model.peft_config[policy]
        if (config.r, config.lora_alpha) != (rank, rank):  # scale 1, as served
            net.model.delete_adapter(policy)
            net.add_adapter(policy, replace(self.lora, rank=rank, alpha=float(rank)))
            self.core.policy_params = net.adapter_parameters(policy)
        set_peft_model_state_dict(net.model, tensors, adapter_name=policy)
