"""The run configuration's shared sections: dataclasses with defaults that run the embedded
default job. The whole run config (`TrainConfig`, with the algorithm's section) is in
cluster/config.py; unknown keys and wrong types raise `ConfigError` naming the key (`configio`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .configio import ConfigError
from .corpora import DatasetConfig
from .tiny_model import TinyModelSpec

TINY = "tiny"
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256)


@dataclass
class ModelConfig:
    # "tiny" builds (once, cached) the embedded offline model from `tiny` + the task; anything
    # else is a HF hub name or a local path, loaded the same way by the learner and vLLM.
    name_or_path: str = TINY
    # None: bfloat16 in an actor that holds a GPU, float32 on CPU (the default job)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_model_len: int = 128
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)
    # a Jinja chat template in place of the tokenizer's own (renders conversational prompts)
    chat_template: str | None = None
    # the learner's attention kernel (transformers' attn_implementation; flash_attention_2
    # needs the flash-attn package and a GPU); None: transformers' choice
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        ]
    )

    def validate(self) -> None:
        if self.rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"lora.rank: vLLM supports {VLLM_LORA_RANKS}; got {self.rank}")


@dataclass
class RolloutConfig:
    num_workers: int = 2
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 6
    # generation also ends at any of these strings (cut from the text the rewards see) or ids
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    cpus_per_worker: float = 0.5  # Ray scheduling share; fractional so the default fits 2 cores
    threads_per_worker: int = 1  # torch/OpenMP threads inside the engine
    kv_cache_gib: int = 1
    probe_prompts: int = 4  # prompts of the fixed probe that verifies every adapter sync
    # prompts longer than model.max_model_len - max_new_tokens: "error" names the first;
    # "skip" leaves them out, counted in the output and summary.json
    too_long_prompts: Literal["error", "skip"] = "error"
    # max |vLLM - learner| logprob on the probe; None picks by dtype (1e-3 f32, 5e-2 half)
    sync_tolerance: float | None = None
    # GPUs of each engine: a fraction shares one GPU (0.5: two engines on it); with
    # tensor_parallel_size > 1 it is a whole number >= tensor_parallel_size, all on one node
    num_gpus_per_worker: float = 0.0
    tensor_parallel_size: int = 1  # vLLM's, over the worker's own GPUs (needs a GPU)
    # vLLM's share of each of its GPUs (weights + KV cache); None: vLLM's default (0.9)
    gpu_memory_utilization: float | None = None
    # custom Ray resources each worker reserves (a node type's `resources`, e.g. {a100: 1})
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.num_workers < 1 or self.samples_per_prompt < 1:
            raise ConfigError("rollout.num_workers and rollout.samples_per_prompt must be >= 1")
        check_gpus("rollout.num_gpus_per_worker", self.num_gpus_per_worker)
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {tp}")
        if tp > 1 and (self.num_gpus_per_worker < tp or self.num_gpus_per_worker % 1):
            raise ConfigError(
                f"rollout.tensor_parallel_size={tp} needs rollout.num_gpus_per_worker to be a "
                f"whole number >= {tp} (one GPU per shard), got {self.num_gpus_per_worker:g}")
        memory = self.gpu_memory_utilization
        if memory is not None and not 0 < memory <= 1:
            raise ConfigError(f"rollout.gpu_memory_utilization must be in (0, 1], got {memory}")
        if memory is not None and not self.num_gpus_per_worker:
            raise ConfigError("rollout.gpu_memory_utilization is set but rollout.num_gpus_per_"
                              "worker is 0 (CPU engines size their KV cache by kv_cache_gib)")


def check_gpus(key: str, gpus: float) -> None:
    """A GPU ask: 0 (CPU), a fraction of one GPU, or whole GPUs."""
    if gpus < 0 or (gpus > 1 and gpus % 1):
        raise ConfigError(f"{key} must be 0, a fraction in (0, 1] (a share of one GPU) or a "
                          f"whole number of GPUs, got {gpus:g}")


@dataclass
class RewardConfig:
    num_actors: int = 2
    # reward functions (names in reward.registry.REWARD_FNS or package.module:function, TRL's
    # contract), summed with `weights` (empty: 1.0 each); empty: the task's own reward
    fns: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    batch_size: int = 64  # rollouts per scoring call (the unit of load balancing)
    cpus_per_actor: float = 0.1
    num_gpus_per_actor: float = 0.0  # a reward model on a GPU (a fraction shares one)
    resources_per_actor: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    # a reward that raises or is not finite: "fail" stops the run naming the sample; "skip"
    # drops that prompt's whole group from the update, counted per iteration (reward_errors)
    on_error: Literal["fail", "skip"] = "fail"
    # The reward is rule_weight * rule + model_weight * (learned reward model's score). The
    # rule is always computed when it has weight or a task reference to log against.
    rule_weight: float = 1.0
    # a reward model directory (`lorafleet train-rm` output); with an `rm` stage, leave it
    # unset: the stage's model (RUN_DIR/reward_model) is used
    model: str | None = None
    model_weight: float = 1.0
    # PERL's memory option: score with a reward adapter on the learner's own base model (one
    # base for policy, value and reward) instead of a base copy in every reward actor
    model_on_learner: bool = False
    threads_per_actor: int = 1  # torch threads of a reward actor that hosts a reward model
    # "running": (r - mean) / std over every training reward so far (checkpointed); then
    # clipped to +-clip when set. Evaluations report unnormalised rewards.
    normalize: Literal["none", "running"] = "none"
    clip: float | None = None

    def validate(self) -> None:
        if self.weights and len(self.weights) != len(self.fns):
            raise ConfigError(f"reward.weights: {len(self.weights)} weights for "
                              f"{len(self.fns)} reward.fns (give one per function, or none)")
        if self.rule_weight == 0 and self.model_weight == 0:
            raise ConfigError("reward.rule_weight and reward.model_weight are both 0")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"reward.clip must be > 0 (or null), got {self.clip}")
        check_gpus("reward.num_gpus_per_actor", self.num_gpus_per_actor)


@dataclass
class SFTConfig:
    """The `sft` stage: supervised fine-tuning of the policy adapter on prompt/response rows."""

    data: DatasetConfig = field(default_factory=DatasetConfig)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class DPOConfig:
    """The `dpo` stage: offline preference optimisation; the reference is the base model with
    the adapters off (no second model copy)."""

    data: DatasetConfig = field(default_factory=DatasetConfig)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    beta: float = 0.5

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")


@dataclass
class MeetConfig:
    """The `meet` stage (MEET: alignment as controllable generation): one control per quality
    level of the data, learned on that level's responses; at inference the best level's
    control conditions generation. Stage 1 trains each level's control LoRA with everything
    else frozen; stage 2 trains the controls together with a shared policy LoRA (standing for
    the model), each response under its own level's control. The served policy of level k is
    one LoRA, control k and the shared LoRA side by side (rank + lora.rank), so later stages
    (`[meet, rl]`, `[meet, dpo]`) continue from the best level's. `control: text` is Chain of
    Hindsight: the level's hand-written text leads the prompt, stage 2 trains the policy."""

    data: DatasetConfig = field(default_factory=DatasetConfig)
    # the level of a row: an integer column (0 = worst), or a score column cut at the
    # increasing `bins` edges (K = len(bins) + 1 levels); path=task: the task's scored rows
    level_column: str | None = None
    score_column: str | None = "score"
    bins: list[float] = field(default_factory=lambda: [-0.3, 0.3])
    best_level: int | None = None  # None: the highest level
    control: Literal["lora", "text"] = "lora"
    rank: int = 8  # of each control LoRA
    control_texts: list[str] = field(default_factory=list)  # control=text: one per level
    stage1_epochs: int = 2  # 0: stage 2 only (an ablation)
    stage1_lr: float = 2e-3
    stage2_epochs: int = 1  # 0: stage 1 only (an ablation)
    stage2_lr: float = 1e-3
    batch_size: int = 32

    def validate(self) -> None:
        if (self.level_column is None) == (self.score_column is None):
            raise ConfigError("meet: set one of meet.level_column and meet.score_column")
        if self.level_column is not None and self.bins:
            raise ConfigError("meet.bins cut meet.score_column; with meet.level_column leave "
                              "them empty (bins: [])")
        if self.score_column is not None and (
            not self.bins or self.bins != sorted(set(self.bins))
        ):
            raise ConfigError(f"meet.bins must be increasing score edges (K-1 of them for K "
                              f"levels), got {self.bins}")
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or (
            self.stage1_epochs + self.stage2_epochs == 0
        ):
            raise ConfigError("meet.stage1_epochs and meet.stage2_epochs must be >= 0, not both 0")
        if self.control == "text":
            if self.stage1_epochs:
                raise ConfigError("meet.control=text has no control weights to train in stage "
                                  "1: set meet.stage1_epochs=0")
            if len(self.control_texts) < 2:
                raise ConfigError("meet.control=text needs meet.control_texts, one per level")
        elif self.control_texts:
            raise ConfigError("meet.control_texts is for meet.control=text (Chain of Hindsight)")
        if self.best_level is not None and self.best_level < 0:
            raise ConfigError(f"meet.best_level must be >= 0, got {self.best_level}")

    @property
    def levels(self) -> int | None:
        """K, when the bins fix it (a level column's K comes from its data)."""
        return len(self.bins) + 1 if self.score_column is not None else None


@dataclass
class RewardModelConfig:
    """The `rm` stage and `lorafleet train-rm`: a LoRA reward adapter + scalar head on the base
    model (not on the policy adapter), Bradley-Terry loss on preference pairs."""

    data: DatasetConfig = field(default_factory=DatasetConfig)
    eval_fraction: float = 0.1  # seeded share of the pairs held out for accuracy / margin
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3

    def validate(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"rm.eval_fraction must be in (0, 1), got {self.eval_fraction}")


@dataclass
class LearnerConfig:
    cpus: float = 0.8
    threads: int = 2  # the learner runs while rollout workers idle in the synchronous loop
    num_gpus: float = 0.0  # the learner trains on one GPU (a fraction shares it)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory

    def validate(self) -> None:
        check_gpus("learner.num_gpus", self.num_gpus)
        if self.num_gpus > 1:
            raise ConfigError(f"learner.num_gpus={self.num_gpus:g}: the learner trains on one "
                              "GPU (a fraction shares it with other actors)")


@dataclass
class PlacementConfig:
    """How the run's one placement group spreads the actors' bundles over the nodes (Ray's
    strategies): PACK fills few nodes, SPREAD one actor per node where it can, STRICT_PACK
    all on one node or none."""

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = "PACK"
    # a run whose actors are not all placed by then fails naming what is missing (Ray would
    # wait forever); a cluster we start ourselves fails at once. Raise it while an autoscaler
    # adds GPU nodes (minutes).
    timeout_s: float = 60.0


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = None  # for a local cluster; None = all cores
    # Rollout and reward actors that die (preempted node, OOM) are restarted up to this many
    # times each; lost work is re-sent (rollout workers get the current adapter first).
    max_actor_restarts: int = 3


@dataclass
class LoggingConfig:
    """metrics.jsonl is always written; these add sinks."""

    rollouts_parquet: bool = False  # rollouts/stageK_iterNNNNN.parquet: prompt, response, reward
    wandb: bool = False  # needs `pip install wandb`; offline mode when no API key is set
    wandb_project: str = "lorafleet"
    ray_metrics: bool = True  # ray.util.metrics gauges/counters for the dashboard/Prometheus
