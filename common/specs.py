"""What an actor is built from, as one record: each field is named as the run config key it
comes from (section in the comment), built from the run config in one place
(cluster/fleet.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DEFAULT_MAX_BEHAVIOUR_WEIGHT, LoRAConfig


@dataclass(frozen=True)
class LearnerSpec:
    model_path: str  # model.name_or_path, resolved: a local directory or a hub name
    pad_token_id: int  # the driver tokenizer's
    # algo: the algorithm's section (an AlgoConfig of learner/algorithms/registry.py); every
    # stage reads its max_grad_norm, the rl stage all of it
    algo: object
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    stages: tuple[str, ...] = ("rl",)  # the rl stage adds the RL updater (and a value adapter)
    dtype: str | None = None  # model.dtype; None: bfloat16 on a GPU, float32 on the CPU
    seed: int = 0
    threads: int = 1  # learner.threads
    attn_implementation: str | None = None  # model.attn_implementation
    gradient_checkpointing: bool = False  # learner.gradient_checkpointing
    autocast: str = "off"  # learner.autocast
    # rollout.max_staleness as the run applies it: how many versions behind the learner a
    # rollout's adapter may be (0: rollout.mode=sync, on-policy only, no behaviour weights)
    max_staleness: int = 0
    max_behaviour_weight: float = DEFAULT_MAX_BEHAVIOUR_WEIGHT  # rollout.max_behaviour_weight
    # not a config key: None puts the learner on the GPU Ray assigned it, else the CPU; the
    # benches name one
    device: str | None = None
