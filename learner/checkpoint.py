"""Saving the learner actor: its adapters in PEFT format, and checkpoints that continue
training exactly (adapters, heads, optimiser and RNG states, the adapter version)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.state_io import load_state, save_state
from .model import POLICY, REWARD, VALUE, load_adapter, save_adapter


class CheckpointMixin:
    """Uses the learner core's state (net, optimisers, generator, version) and the reward
    adapter's trainer (RewardAdapterMixin)."""

    def save(self, directory: str) -> str:
        """Policy adapter in PEFT format at `directory`; value / reward adapters (+ heads) in
        sub-directories named after them."""
        path = Path(directory)
        for name in self.adapter_names():
            save_adapter(self.net, name, self.version, path if name == POLICY else path / name)
        return str(path)

    def adapter_names(self) -> list[str]:
        return [POLICY, *(n for n in (VALUE, REWARD) if n in self.net.heads)]

    def save_checkpoint(self, directory: str) -> str:
        """Everything to continue training exactly: adapters (PEFT format), value head,
        optimiser states, RNG states, the adapter version (safetensors + JSON, no pickle)."""
        path = Path(self.save(directory))
        state = {
            "version": self.version,
            "policy_opt": self.policy_opt.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.with_value:
            state["value_opt"] = self.value_opt.state_dict()
        if self.reward_trainer is not None:
            state["reward_trainer"] = self.reward_trainer.state()
        save_state(state, path, "learner_state")
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restore a `save_checkpoint` directory; returns the adapter version it holds."""
        path = Path(directory)
        state = load_state(path, "learner_state")
        if "reward_trainer" in state and REWARD not in self.net.heads:
            self.start_reward_model(self.algo.policy_lr)  # lr comes back with the state
        for name in self.adapter_names():
            load_adapter(self.net, name, path if name == POLICY else path / name)
        if self.with_value:
            self.value_opt.load_state_dict(state["value_opt"])
        if "reward_trainer" in state:
            self.reward_trainer.load_state(state["reward_trainer"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.version = state["version"]
        return self.version
