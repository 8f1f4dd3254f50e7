"""`lorafleet serve`'s configuration: the fleet's sections as a run has them (model, task for
the embedded model, rollout workers, learner, placement, ray) and the server's own `serve`
section. Clients bring the rest (adapters' ranks, sampling, losses, optimiser settings), so
the run keys a server has no use for are errors here, not silently ignored."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from ...common.config import (
    VLLM_LORA_RANKS,
    LearnerConfig,
    LoRAConfig,
    ModelConfig,
    PlacementConfig,
    RayConfig,
    RolloutConfig,
)
from ...common.configio import ConfigError, load_config
from ...common.tasks.registry import TaskConfig
from ..config import TrainConfig

# the rollout keys a server uses: the workers and their engines; a client chooses how to sample
SERVED_ROLLOUT_KEYS = (
    "num_workers", "cpus_per_worker", "threads_per_worker", "kv_cache_gib", "sync_tolerance",
    "num_gpus_per_worker", "tensor_parallel_size", "gpu_memory_utilization",
    "resources_per_worker", "max_loras",
)

# what a LoRA client's train_attn / train_mlp adapt (Llama / Qwen module names)
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ServeSection:
    # 127.0.0.1: this machine only; 0.0.0.0 serves every interface (then set API keys)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port, printed and written to RUN_DIR/server.json
    # the environment variable holding the accepted API keys, comma-separated (each starts
    # with tml-, as the SDK requires); unset or empty: any key is accepted. Keys are read
    # from the environment so that none is written to the run directory.
    api_keys_env: str = "LORAFLEET_API_KEYS"
    max_adapters: int = 8  # training clients alive at once, each an adapter on the learner
    # the largest LoRA rank a client may ask for (the engines reserve room for it)
    max_lora_rank: int = 32
    lora_alpha: float = 32.0  # every client adapter's LoRA alpha
    # a session with no heartbeat or request for this long is closed: its adapters and
    # samplers are freed (saved states stay on disk)
    idle_timeout_s: float = 300.0
    # a retrieve_future call waits this long for its result before answering "try again"
    poll_hold_s: float = 30.0
    # a training request waits this long for the earlier requests of its client (by seq_id)
    # before it fails
    seq_gap_timeout_s: float = 120.0
    max_sample_batch: int = 256  # sequences per engine round, taken in turn from each client
    # Tinker's clock cycle: training requests of several clients ready together or arriving
    # within this many seconds of the first run as one learner pass (one forward/backward)
    cycle_s: float = 0.005
    # save_weights_and_get_sampling_client samplers kept per training client: an RL loop makes
    # one per step, so the oldest beyond this many are freed (named samplers stay on disk)
    samplers_per_client: int = 4
    # train_unembed=true (the SDK's default): error, or ignore (adapt attention and MLP only);
    # vLLM serves no LoRA on the LM head together with prompt log-probs
    unembed: Literal["error", "ignore"] = "error"

    def validate(self) -> None:
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"serve.max_lora_rank: vLLM supports {VLLM_LORA_RANKS}; "
                              f"got {self.max_lora_rank}")
        if min(self.max_adapters, self.max_sample_batch, self.samplers_per_client) < 1:
            raise ConfigError("serve.max_adapters, serve.max_sample_batch and "
                              "serve.samplers_per_client must be >= 1")


@dataclass
class ServeConfig:
    # the server's states and sampler weights (tinker://... paths) live under it
    run_dir: str = "runs/serve"
    seed: int = 0  # the engines' seed; a sample without its own seed draws one from it
    # with model.name_or_path=tiny: the task whose embedded model is served
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serve: ServeSection = field(default_factory=ServeSection)

    def validate(self) -> None:
        defaults = RolloutConfig()
        unused = [f"rollout.{f.name}" for f in fields(RolloutConfig)
                  if f.name not in SERVED_ROLLOUT_KEYS
                  and getattr(self.rollout, f.name) != getattr(defaults, f.name)]
        if unused:
            raise ConfigError(f"{', '.join(unused)}: a server's clients choose how to sample "
                              f"(SamplingParams); lorafleet serve takes only "
                              f"rollout.{{{', '.join(SERVED_ROLLOUT_KEYS)}}}")
        if self.placement.colocate == "on":
            raise ConfigError("placement.colocate=on: the Tinker service keeps the learner "
                              "and the engines apart (clients train and sample at once)")

    def train_config(self) -> TrainConfig:
        """The run config the fleet's actors are built from (cluster/specs.py): one policy,
        the learner's own (never served), at the largest rank a client may ask for."""
        return TrainConfig(
            run_dir=self.run_dir, seed=self.seed, task=self.task, model=self.model,
            lora=LoRAConfig(rank=self.serve.max_lora_rank, alpha=self.serve.lora_alpha),
            rollout=self.rollout, learner=self.learner,
            placement=replace(self.placement, colocate="off"), ray=self.ray)


def load_serve_config(path: str | Path | None, overrides: list[str] = ()) -> ServeConfig:
    return load_config(ServeConfig, path, list(overrides))
