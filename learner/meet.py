"""The meet stage on the learner actor (MEET: alignment as controllable generation).

Adapters beside the policy: `control0` .. `control{K-1}` (one LoRA per quality level) and
`shared` (the policy LoRA that stage 2 trains with them). A response of level k trains under
control k (stage 1) or control k and `shared` together (stage 2). The policy the fleet serves
for level k is one LoRA holding both side by side (`side_by_side`), so publishing, the probe
check and the later stages work on it unchanged; the K levels' LoRAs are also served at once
(`publish_level`), each verified by the probe against the learner's own control + shared.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..common.records import AdapterSnapshot, OfflineStats, ProbeResult, SFTExample
from .model import POLICY, collate

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


class MeetMixin:
    """Uses the learner core's net, lora, pad_id, step, version and policy_params."""

    def start_meet(self, levels: int, rank: int) -> None:
        """K control LoRAs of `rank` and the shared policy LoRA, all fresh."""
        self.meet_levels = levels
        for level in range(levels):
            self.net.add_adapter(control_name(level), replace(self.lora, rank=rank))
        self.net.add_adapter(SHARED, self.lora)

    def start_meet_phase(self, lr: float, with_shared: bool) -> None:
        """Stage 1 (controls alone) or stage 2 (controls and the shared LoRA): a fresh
        optimiser over what the phase trains."""
        self.meet_shared = with_shared
        names = [control_name(k) for k in range(self.meet_levels)] + [SHARED] * with_shared
        self.meet_params = [p for name in names for p in self.net.adapter_parameters(name)]
        self.meet_opt = torch.optim.AdamW(self.meet_params, lr=lr, weight_decay=0)

    def meet_step(self, examples: list[SFTExample]) -> OfflineStats:
        """The SFT token loss over the minibatch, each row under its own level's adapters (one
        forward per level present)."""
        batch = collate(
            [e.prompt_ids for e in examples], [e.response_ids for e in examples], self.pad_id,
            self.net.device,
        )
        levels = torch.tensor([e.level for e in examples], device=self.net.device)
        logp = torch.zeros_like(batch.mask)
        for level in levels.unique().tolist():
            rows = (levels == level).nonzero().squeeze(1)
            adapters = [control_name(level)] + [SHARED] * self.meet_shared
            with self.autocast():
                level_logp = self.net.logprobs(batch.select(rows), adapters=adapters)
            logp = logp.index_put((rows,), level_logp.float())
        # set_adapter leaves only the last level's adapters requiring grad: a parameter that
        # does not at backward time gets no gradient, so every trained one must again
        for param in self.meet_params:
            param.requires_grad_(True)
        return self.nll_step(batch, logp, self.meet_params, self.meet_opt)

    def level_lora(self, level: int) -> tuple[dict[str, Tensor], int]:
        """Level `level`'s served LoRA (PEFT tensor names, scale 1) and its rank."""
        from peft import get_peft_model_state_dict

        model = self.net.model
        parts = [(get_peft_model_state_dict(model, adapter_name=name),
                  model.peft_config[name].lora_alpha / model.peft_config[name].r)
                 for name in (control_name(level), SHARED)]
        rank = model.peft_config[control_name(level)].r + model.peft_config[SHARED].r
        return side_by_side(*parts[0], *parts[1]), rank

    def publish_level(self, level: int) -> AdapterSnapshot:
        """Level `level`'s served LoRA, for a rollout worker to hold beside the policy
        (stamped with the policy's version: it is what the controls are at now)."""
        tensors, rank = self.level_lora(level)
        config = {**self.publish().peft_config, "r": rank, "lora_alpha": float(rank)}
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        return AdapterSnapshot(version=self.version, peft_config=config, tensors=tensors)

    def check_level_probe(self, results: list[ProbeResult], tolerance: float, level: int) -> float:
        """`check_probe` of workers serving level `level`'s LoRA, against the learner's own
        control and shared adapters together (HF + PEFT, not the side-by-side copy)."""
        return self.check_probe(results, tolerance, adapters=[control_name(level), SHARED])

    @torch.no_grad()
    def use_level(self, level: int) -> int:
        """Make the policy adapter level `level`'s served LoRA (the later stages continue from
        it); returns the new adapter version."""
        from peft import set_peft_model_state_dict

        tensors, rank = self.level_lora(level)
        model = self.net.model
        if model.peft_config[POLICY].r != rank:
            model.delete_adapter(POLICY)
            self.net.add_adapter(POLICY, replace(self.lora, rank=rank, alpha=float(rank)))
            self.policy_params = self.net.adapter_parameters(POLICY)
        set_peft_model_state_dict(model, tensors, adapter_name=POLICY)
        self.version += 1
        return self.version
