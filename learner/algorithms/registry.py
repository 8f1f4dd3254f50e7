"""Algorithms by name: each is a config dataclass (the keys of the `algo:` section it reads,
with their defaults) and its objective, the one function of a scored batch that makes it this
algorithm (learner/objectives.py: advantages or sample weights, and the loss the RL updater
minimises with them). A new algorithm is an objective function plus, here, its config class
and one `register` line.

Config loading reads only this module, so the driver never imports torch: an objective is
named as "module:function" in lorafleet.learner and imported when the RL updater is built
(`objective_function`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from ...common.config import RolloutConfig
from ...common.configio import ConfigError

LEARNER_PACKAGE = __package__.rpartition(".")[0]  # lorafleet.learner


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: type[AlgoConfig]
    objective: str  # "module:function" in lorafleet.learner


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, config: type[AlgoConfig], objective: str) -> None:
    """Make `algo.name: <name>` load `config` and train with `objective`."""
    if name in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} is registered twice")
    ALGORITHMS[name] = Algorithm(name, config, objective)


def algorithm(name: str, key: str = "algo.name") -> Algorithm:
    if not isinstance(name, str) or name not in ALGORITHMS:
        choices = ", ".join(repr(n) for n in ALGORITHMS)
        raise ConfigError(f"{key}: expected one of {choices}, got {name!r}")
    return ALGORITHMS[name]


def objective_function(algo: AlgoConfig):
    """The objective `algo` trains with (imported here: it needs torch)."""
    module, _, name = algo.objective().partition(":")
    return getattr(importlib.import_module(f"{LEARNER_PACKAGE}.{module}"), name)


@dataclass
class AlgoConfig:
    """The keys every algorithm reads; each registered subclass adds its own. `algo.name`
    picks the subclass when a config is loaded (`config_class`), so a key the chosen
    algorithm does not read is an error naming the algorithms that do."""

    name: str = "ppo"  # the algorithm a config without algo.name runs
    policy_lr: float = 1e-3  # the rl stage's policy optimiser (sft, dpo, rm have their own)
    epochs: int = 2  # passes over each iteration's batch
    minibatch_size: int = 64
    max_grad_norm: float = 1.0  # every optimiser step: rl, sft, dpo, rm
    # rl minibatches run as micro-batches of at most this many tokens (padded rows x length),
    # their gradients accumulated into one optimiser step; None: the whole minibatch at once
    max_tokens_per_microbatch: int | None = None

    @classmethod
    def config_class(cls, data: Mapping[str, Any], prefix: str) -> type[AlgoConfig]:
        """configio's hook: the registered dataclass of `data`'s name (default: cls's own)."""
        key = f"{prefix}.name" if prefix else "name"
        return algorithm(data.get("name", cls.name), key).config

    @classmethod
    def unknown_keys_hint(cls, keys: list[str]) -> str:
        """configio's hook: which algorithms read the keys this one does not."""
        hints = []
        for key in keys:
            readers = [a.name for a in ALGORITHMS.values() if key in config_keys(a.config)]
            if readers:
                hints.append(f"{key!r} is read by algo.name={', '.join(readers)}")
        return f" (this is algo.name={cls.name}; {'; '.join(hints)})" if hints else ""

    def validate(self) -> None:
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ConfigError("algo.max_tokens_per_microbatch must be >= 1 (or null), got "
                              f"{self.max_tokens_per_microbatch}")
        if algorithm(self.name).config is not type(self):
            raise ConfigError(
                f"algo.name={self.name} is configured by {algorithm(self.name).config.__name__}"
                f", not {type(self).__name__}"
            )

    def check_run(self, rollout: RolloutConfig) -> None:
        """Checks that need the run's other sections (called by the run config's validate)."""

    @property
    def uses_reference(self) -> bool:
        """Whether the learner computes the adapter-off reference log-probs of each batch (a
        forward pass): for the KL term, and where there is none (spr, best_of_n) to log it."""
        return True

    @property
    def needs_old_logp_first(self) -> bool:
        """Whether the old log-probs shape the rewards before the update's first forward pass
        (then they cannot come from that pass)."""
        return False

    @property
    def value_model(self) -> bool:
        """Whether the objective fits a value adapter + scalar head beside the policy (it is
        created with the policy, before any other adapter)."""
        return False

    def objective(self) -> str:
        """The objective, as "module:function" in lorafleet.learner, this config trains with."""
        return algorithm(self.name).objective


def config_keys(config: type[AlgoConfig]) -> set[str]:
    return {f.name for f in fields(config) if f.init}


@dataclass
class ClippedObjectiveConfig(AlgoConfig):
    """The clipped policy objective against the adapter-off reference (ppo, grpo, rloo)."""

    clip_eps: float = 0.2
    kl_coef: float = 0.02
    # "reward": -kl_coef * k1 per token folded into the rewards (InstructGPT/OpenRLHF; for
    # grpo/rloo the sequence sum is subtracted from the score before the group baseline);
    # "loss": kl_coef * k3 added to the policy loss (GRPO-style), rewards left unshaped.
    kl_mode: Literal["reward", "loss"] = "reward"

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef != 0  # the KL term is the reference's only use here

    @property
    def needs_old_logp_first(self) -> bool:
        return self.kl_mode == "reward" and self.kl_coef != 0


@dataclass
class PPOConfig(ClippedObjectiveConfig):
    """PPO: GAE + clipped policy and value losses, with a LoRA critic."""

    name: str = "ppo"
    value_lr: float = 5e-3
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True

    @property
    def value_model(self) -> bool:
        return True  # the critic


@dataclass
class GRPOConfig(ClippedObjectiveConfig):
    """GRPO: group-normalised advantages on the clipped objective, no critic."""

    name: str = "grpo"
    scale_by_std: bool = True  # False: mean baseline only (Dr. GRPO)


@dataclass
class RLOOConfig(ClippedObjectiveConfig):
    """RLOO: leave-one-out advantages on the clipped objective, no critic."""

    name: str = "rloo"

    def check_run(self, rollout: RolloutConfig) -> None:
        if rollout.samples_per_prompt < 2:
            raise ConfigError("algo.name=rloo needs rollout.samples_per_prompt >= 2")


@dataclass
class WeightedSFTConfig(AlgoConfig):
    """Re-weighted likelihood of the samples (spr, best_of_n): no critic, no reference."""

    length_normalize: bool = False  # per-token mean log-likelihood instead of the sum

    def check_run(self, rollout: RolloutConfig) -> None:
        if rollout.mode == "async":
            raise ConfigError(
                f"algo.name={self.name} has no importance ratio to correct samples of an older "
                "adapter: rollout.mode=async needs algo.name=ppo, grpo or rloo")


@dataclass
class SPRConfig(WeightedSFTConfig):
    """SPR: weighted SFT on the samples with w = n * softmax(r / weight_temperature) per
    prompt, clipped at max_weight."""

    name: str = "spr"
    # -> 0 is best-of-N SFT, -> inf is plain SFT
    weight_temperature: float = 0.5
    max_weight: float | None = 4.0  # None: no clipping
    # "group" normalises each prompt's weights over its n samples; "learned" fits V(x) (LoRA
    # + scalar head regression on the rewards, AWR-style) for w = exp((r - V(x)) /
    # weight_temperature), the paper's variant for one sample per prompt.
    normalizer: Literal["group", "learned"] = "group"
    value_lr: float = 5e-3  # the learned normaliser's optimiser

    def validate(self) -> None:
        super().validate()
        if self.weight_temperature <= 0:
            raise ConfigError(f"algo.weight_temperature must be > 0, got {self.weight_temperature}")

    def check_run(self, rollout: RolloutConfig) -> None:
        super().check_run(rollout)
        if self.normalizer == "group" and rollout.samples_per_prompt == 1:
            raise ConfigError(
                "algo.name=spr with rollout.samples_per_prompt=1 gives every sample weight 1 "
                "(plain SFT); use algo.normalizer=learned or samples_per_prompt >= 2"
            )

    @property
    def value_model(self) -> bool:
        return self.normalizer == "learned"

    def objective(self) -> str:
        if self.normalizer == "learned":
            return "objectives:spr_learned_normalizer"
        return super().objective()


@dataclass
class BestOfNConfig(WeightedSFTConfig):
    """best_of_n: SFT on each prompt's best sample (SPR's weight_temperature -> 0; ReST/RAFT)."""

    name: str = "best_of_n"


register("ppo", PPOConfig, "objectives:ppo")
register("grpo", GRPOConfig, "objectives:grpo")
register("rloo", RLOOConfig, "objectives:rloo")
register("spr", SPRConfig, "objectives:spr")
register("best_of_n", BestOfNConfig, "objectives:best_of_n")
