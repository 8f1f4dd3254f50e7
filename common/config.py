"""The run configuration: dataclasses with defaults that run the embedded default job.

Load with `load_train_config(path, ["rollout.num_workers=1", ...])`; unknown keys and wrong
types raise `ConfigError` naming the key (see `configio`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .configio import ConfigError, load_config
from .corpora import DatasetConfig
from .tasks.registry import TaskConfig
from .tiny_model import TinyModelSpec

TINY = "tiny"


@dataclass
class ModelConfig:
    # "tiny" builds (once, cached) the embedded offline model from `tiny` + the task; anything
    # else is a HF hub name or a local path, loaded the same way by the learner and vLLM.
    name_or_path: str = TINY
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = 128
    tiny: TinyModelSpec = field(default_factory=TinyModelSpec)


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
        if self.rank not in (8, 16, 32, 64, 128, 256):
            raise ConfigError(f"lora.rank: vLLM supports 8, 16, 32, 64, 128, 256; got {self.rank}")


@dataclass
class RolloutConfig:
    num_workers: int = 2
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 6
    cpus_per_worker: float = 0.5  # Ray scheduling share; fractional so the default fits 2 cores
    threads_per_worker: int = 1  # torch/OpenMP threads inside the engine
    kv_cache_gib: int = 1
    probe_prompts: int = 4  # prompts of the fixed probe that verifies every adapter sync
    # prompts longer than model.max_model_len - max_new_tokens: "error" names the first;
    # "skip" leaves them out, counted in the output and summary.json
    too_long_prompts: Literal["error", "skip"] = "error"
    # max |vLLM - learner| logprob on the probe; None picks by dtype (1e-3 f32, 5e-2 half)
    sync_tolerance: float | None = None

    def validate(self) -> None:
        if self.num_workers < 1 or self.samples_per_prompt < 1:
            raise ConfigError("rollout.num_workers and rollout.samples_per_prompt must be >= 1")


@dataclass
class RewardConfig:
    num_actors: int = 2
    fn: str | None = None  # a name in reward.registry.REWARD_FNS; None = the task's own reward
    batch_size: int = 64  # rollouts per scoring call (the unit of load balancing)
    cpus_per_actor: float = 0.1
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
        if self.rule_weight == 0 and self.model_weight == 0:
            raise ConfigError("reward.rule_weight and reward.model_weight are both 0")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"reward.clip must be > 0 (or null), got {self.clip}")


ALGORITHMS = ("ppo", "grpo", "rloo", "spr", "best_of_n")


@dataclass
class AlgoConfig:
    """One section for every algorithm; each reads the keys it needs (comments say which).

    ppo: GAE + clipped policy/value losses with a LoRA critic. grpo / rloo: group-normalised /
    leave-one-out advantages on the clipped objective, no critic. spr: weighted SFT on the
    samples with w = n * softmax(r / beta), no critic, no reference needed. best_of_n: SFT on
    each prompt's best sample (SPR's beta -> 0 limit; ReST/RAFT).
    """

    name: Literal["ppo", "grpo", "rloo", "spr", "best_of_n"] = "ppo"
    policy_lr: float = 1e-3
    value_lr: float = 5e-3  # ppo
    epochs: int = 2  # passes over each iteration's batch
    minibatch_size: int = 64
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02  # ppo, grpo, rloo
    # "reward": -kl_coef * k1 per token folded into the rewards (InstructGPT/OpenRLHF; for
    # grpo/rloo the sequence sum is subtracted from the score before the group baseline);
    # "loss": kl_coef * k3 added to the policy loss (GRPO-style), rewards left unshaped.
    kl_mode: Literal["reward", "loss"] = "reward"
    whiten_advantages: bool = True  # ppo
    grpo_scale_by_std: bool = True  # grpo: False = mean baseline only (Dr. GRPO)
    beta: float = 0.5  # spr temperature: -> 0 is best-of-N SFT, -> inf is plain SFT
    max_weight: float | None = 4.0  # spr: clip sample weights (None: no clipping)
    # spr: "group" normalises each prompt's weights over its n samples; "learned" fits V(x)
    # (LoRA + scalar head regression on the rewards, AWR-style) for w = exp((r - V(x)) / beta),
    # the paper's variant for one sample per prompt.
    spr_normalizer: Literal["group", "learned"] = "group"
    length_normalize: bool = False  # spr / best_of_n: per-token mean log-likelihood
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"algo.beta must be > 0, got {self.beta}")


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


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    iterations: int = 40
    prompts_per_iteration: int = 64
    eval_every: int = 10  # greedy accuracy on the held-out split; 0 = only at start and end
    checkpoint_every: int = 10
    # Stages run in order on the same adapter, with a held-out evaluation after each: "sft"
    # (section sft), "dpo" (section dpo), "rl" (`iterations` of algo.name), e.g. [sft, rl].
    # "rm" (section rm) trains the reward model the later stages are scored with; it must come
    # first (it scores every evaluation; it trains on the base, so the chain does not alter it).
    stages: list[Literal["rm", "sft", "dpo", "rl"]] = field(default_factory=lambda: ["rl"])
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        if self.iterations < 1 or self.prompts_per_iteration < 1:
            raise ConfigError("iterations and prompts_per_iteration must be >= 1")
        if not self.stages:
            raise ConfigError("stages is empty; allowed entries: rm, sft, dpo, rl")
        if "rm" in self.stages[1:]:
            raise ConfigError(
                f"stages {self.stages}: rm must be the first stage (its reward model scores "
                "every evaluation; it trains on the base model, so running it first changes "
                "nothing else)"
            )
        if "rm" in self.stages and self.reward.model is not None:
            raise ConfigError(
                "reward.model is set and an rm stage trains one: drop one of them (the rm "
                "stage's model is RUN_DIR/reward_model)"
            )
        if self.reward.rule_weight == 0 and not self.uses_reward_model:
            raise ConfigError(
                "reward.rule_weight is 0 and there is no reward model (set reward.model to a "
                "`lorafleet train-rm` output or add an rm stage)"
            )
        if self.reward.model_on_learner and not self.uses_reward_model:
            raise ConfigError("reward.model_on_learner is set but there is no reward model")
        if self.algo.name == "rloo" and self.rollout.samples_per_prompt < 2:
            raise ConfigError("algo.name=rloo needs rollout.samples_per_prompt >= 2")
        if (self.algo.name, self.algo.spr_normalizer, self.rollout.samples_per_prompt) == (
            "spr", "group", 1
        ):
            raise ConfigError(
                "algo.name=spr with rollout.samples_per_prompt=1 gives every sample weight 1 "
                "(plain SFT); use algo.spr_normalizer=learned or samples_per_prompt >= 2"
            )

    @property
    def uses_reward_model(self) -> bool:
        return "rm" in self.stages or self.reward.model is not None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, list(overrides))
