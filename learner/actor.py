"""The learner actor: the adapter stack (the base model with its LoRA adapters) and the one
adapter version, with the updaters composed in: RL (the rl stage), offline (sft, dpo), the
reward adapter (the rm stage, reward.model_on_learner) and MEET (the meet stage), each
created when its stage needs it.

The version is the number of updates applied to the weights the learner publishes: the
policy adapter, and in the meet stage the controls and shared LoRA its levels are served
from. Only `advance` moves it. A snapshot carries the version its weights are at; a step's
stats (TrainStats, OfflineStats) the version it trained on, the learner being one past it
after the step (the rm stage counts the reward adapter's own steps the same way).
"""

from __future__ import annotations

import resource

import torch

from ..common.devices import actor_device, autocast_dtype, model_dtype
from ..common.records import (
    AdapterSnapshot,
    OfflineStats,
    PreferencePair,
    ProbeResult,
    ScoredRollout,
    SFTExample,
    TrainStats,
)
from ..common.specs import LearnerSpec
from .checkpoint import load_checkpoint, save_adapters, save_checkpoint
from .core import LearnerCore
from .meet import SHARED, MeetUpdater
from .model import DTYPES, POLICY, VALUE, PolicyValueModel
from .offline import OfflineUpdater
from .reward_adapter import RewardAdapter
from .rl import RLUpdater


class Learner:
    def __init__(self, spec: LearnerSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        device, dtype = spec.device, spec.dtype
        if device is None:
            device, dtype = actor_device(dtype)
        self.dtype = model_dtype(dtype, device != "cpu")
        algo, rl = spec.algo, "rl" in spec.stages
        # the value adapter is created with the policy, before any other (the seed's draws)
        adapters = (POLICY, VALUE) if rl and algo.value_model else (POLICY,)
        net = PolicyValueModel(
            spec.model_path, spec.lora, DTYPES[self.dtype], spec.seed, adapters, device,
            spec.attn_implementation, spec.gradient_checkpointing,
        )
        self.core = LearnerCore(net, spec.pad_token_id, algo.max_grad_norm,
                                autocast_dtype(spec.autocast, device, self.dtype), algo.policy_lr)
        self.rl = RLUpdater(self.core, algo, spec.seed, spec.max_staleness,
                            spec.max_behaviour_weight) if rl else None
        self.offline = OfflineUpdater(self.core)
        self.reward: RewardAdapter | None = None  # start_reward_model, load_reward_model
        self.meet: MeetUpdater | None = None  # start_meet
        self.version = 0

    def advance(self) -> int:
        """An update was applied to the published weights: the one place the version moves."""
        self.version += 1
        return self.version

    @property
    def net(self) -> PolicyValueModel:
        return self.core.net

    # -- publishing and sync verification -------------------------------------------------
    def publish(self) -> AdapterSnapshot:
        return self.net.snapshot(POLICY, self.version)

    def get_version(self) -> int:
        return self.version

    def check_probe(self, results: list[ProbeResult], tolerance: float) -> float:
        """Raise SyncError unless every worker's probe log-probs match the policy's; returns
        the max gap."""
        return self.core.check_probe(results, tolerance, self.version, self.net.logprobs)

    def check_level_probe(self, results: list[ProbeResult], tolerance: float, level: int) -> float:
        """`check_probe` of workers serving meet level `level`, against the learner's own
        control and shared adapters together (HF + PEFT, not the served copy)."""
        adapters = "+".join([*self.meet.controls.adapters(level), SHARED])
        return self.core.check_probe(
            results, tolerance, self.version,
            lambda batch: self.meet.level_logprobs(batch, level), f" ({adapters})")

    def peak_memory_mib(self) -> float:
        """The learner's peak memory so far: CUDA's max allocated on a GPU, else the actor
        process's peak RSS (Linux reports ru_maxrss in KiB)."""
        if self.net.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.net.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # -- the policy's updates -------------------------------------------------------------------
    def start_stage(self, lr: float) -> None:
        """A fresh policy optimiser: each stage (sft, dpo, rl) starts its own Adam moments."""
        self.core.start_stage(lr)

    def train_step(self, scored: list[ScoredRollout]) -> TrainStats:
        stats = self.rl.train_step(scored, self.version)
        self.advance()
        return stats

    def sft_step(self, examples: list[SFTExample]) -> OfflineStats:
        stats = self.offline.sft_step(examples, self.version)
        self.advance()
        return stats

    def dpo_step(self, pairs: list[PreferencePair], beta: float) -> OfflineStats:
        stats = self.offline.dpo_step(pairs, beta, self.version)
        self.advance()
        return stats

    # -- the reward adapter ---------------------------------------------------------------------
    def start_reward_model(self, lr: float) -> None:
        """A fresh reward adapter + head (the `rm` stage trains it)."""
        self.reward = RewardAdapter(self.core, self.spec, self.dtype, lr)

    def rm_step(self, pairs: list[PreferencePair]) -> OfflineStats:
        return self.reward.step(pairs)

    def rm_evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.reward.evaluate(pairs)

    def save_reward_model(self, directory: str, info: dict) -> str:
        return self.reward.save(directory, info)

    def load_reward_model(self, directory: str) -> dict:
        if self.reward is None:
            self.reward = RewardAdapter(self.core, self.spec, self.dtype)
        return self.reward.load(directory)

    def score_rollouts(self, rollouts: list) -> list[float]:
        return self.reward.score(rollouts)

    # -- the meet stage -------------------------------------------------------------------------
    def start_meet(self, control: str, levels: int, size: int) -> None:
        self.meet = MeetUpdater(self.core, self.spec.lora, control, levels, size)

    def start_meet_phase(self, lr: float, with_shared: bool) -> None:
        self.meet.start_phase(lr, with_shared)

    def meet_step(self, examples: list[SFTExample]) -> OfflineStats:
        stats = self.meet.step(examples, self.version)
        self.advance()
        return stats

    def publish_level(self, level: int) -> AdapterSnapshot:
        return self.meet.publish_level(level, self.publish())

    def use_level(self, level: int) -> int:
        """The policy becomes level `level`'s served LoRA; returns the new version."""
        self.meet.use_level(level)
        return self.advance()

    # -- saving ---------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        return save_adapters(self.net, self.version, directory)

    def save_checkpoint(self, directory: str) -> str:
        return save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str) -> int:
        self.version = load_checkpoint(self, directory)
        return self.version
