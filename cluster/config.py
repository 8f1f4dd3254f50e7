"""The run configuration: the shared sections (common/config.py), the algorithm's section
(registered by name in learner/algorithms) and the run's own keys, with defaults that run the
embedded default job.

Load with `load_train_config(path, ["rollout.num_workers=1", ...])`; unknown keys and wrong
types raise `ConfigError` naming the key (see `configio`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..common.config import (
    VLLM_LORA_RANKS,
    DPOConfig,
    LearnerConfig,
    LoggingConfig,
    LoRAConfig,
    MeetConfig,
    ModelConfig,
    PlacementConfig,
    RayConfig,
    RewardConfig,
    RewardModelConfig,
    RolloutConfig,
    SFTConfig,
)
from ..common.configio import ConfigError, load_config
from ..common.tasks.registry import TaskConfig
from ..learner.algorithms.registry import AlgoConfig, PPOConfig
from .policies import expand_policies


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
    # "meet" (section meet) trains one control per quality level; the later stages continue
    # from the best level's policy, e.g. [meet, rl] or [meet, dpo].
    stages: list[Literal["rm", "sft", "dpo", "meet", "rl"]] = field(
        default_factory=lambda: ["rl"])
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # the dataclass registered for algo.name (learner/algorithms/registry.py)
    algo: AlgoConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    meet: MeetConfig = field(default_factory=MeetConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Several policies trained at once on one base model and one fleet (rl stage only): each
    # entry is a `name` and overrides of the keys a policy may set (section `policies` below),
    # e.g. [{name: a, seed: 1}, {name: b, seed: 2, algo: {policy_lr: 3e-4}}]; each writes
    # RUN_DIR/<name>/. Empty: one policy, RUN_DIR itself.
    policies: list[dict[str, Any]] = field(default_factory=list)
    # With several policies: how long the policies whose batch is ready wait for a late one
    # (e.g. a slower reward) before they train without it; it trains in a later round.
    # null: every round waits for every policy (the policies step in lock-step).
    late_policy_wait_s: float | None = None

    def validate(self) -> None:
        if self.iterations < 1 or self.prompts_per_iteration < 1:
            raise ConfigError("iterations and prompts_per_iteration must be >= 1")
        if not self.stages:
            raise ConfigError("stages is empty; allowed entries: rm, sft, dpo, meet, rl")
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
        self.algo.check_run(self.rollout)
        if self.placement.colocate == "on":
            self.check_colocate()
        if "meet" in self.stages:
            self.check_meet()
        expand_policies(self)  # each policy's own config is checked here, at load
        if self.late_policy_wait_s is not None:
            if len(self.policies) < 2:
                raise ConfigError("late_policy_wait_s applies to runs of several policies; this "
                                  f"run has {len(self.policies) or 'one'} (drop the key)")
            if self.late_policy_wait_s < 0:
                raise ConfigError(f"late_policy_wait_s must be >= 0, got "
                                  f"{self.late_policy_wait_s}")

    def check_colocate(self) -> None:
        if all(stage == "rm" for stage in self.stages):
            raise ConfigError(f"placement.colocate=on: stages {self.stages} generate nothing, "
                              "so there is no engine to put beside the learner")
        if self.rollout.num_gpus_per_worker and not self.learner.num_gpus:
            raise ConfigError("placement.colocate=on: the colocated engine runs on the "
                              "learner's device; give the learner the GPU (learner.num_gpus)")

    def check_meet(self) -> None:
        meet = self.meet
        if self.stages.count("meet") > 1:
            raise ConfigError(f"stages {self.stages}: one meet stage per run")
        if meet.control != "lora" and self.stages[-1] != "meet":
            needs = {"text": "the control text in every prompt (Chain of Hindsight)",
                     "prompt": "the soft prompt before every prompt, in the learner's passes "
                               "and in generation (not built)"}[meet.control]
            raise ConfigError(f"stages {self.stages}: with meet.control={meet.control} the meet "
                              f"stage comes last (later stages would need {needs})")
        levels = meet.levels
        if levels is not None and meet.control == "text" and len(meet.control_texts) != levels:
            raise ConfigError(f"meet.control_texts: {len(meet.control_texts)} texts for "
                              f"{levels} levels (len(meet.bins) + 1)")
        if levels is not None and meet.best_level is not None and meet.best_level >= levels:
            raise ConfigError(f"meet.best_level={meet.best_level}: the levels are 0..{levels - 1}")
        if self.served_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"meet.rank + lora.rank = {self.served_lora_rank} (the served "
                              f"policy holds both): vLLM supports {VLLM_LORA_RANKS}")

    @property
    def served_lora_rank(self) -> int:
        """The policy LoRA's rank in vLLM: after a meet stage with LoRA controls, a level's
        control and the shared policy side by side."""
        if "meet" in self.stages and self.meet.control == "lora":
            return self.lora.rank + self.meet.control_size
        return self.lora.rank

    @property
    def serves_soft_prompts(self) -> bool:
        """The rollout workers take prompts as embeddings (meet's soft-prompt controls)."""
        return "meet" in self.stages and self.meet.control == "prompt"

    @property
    def uses_reward_model(self) -> bool:
        return "rm" in self.stages or self.reward.model is not None


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, list(overrides))
