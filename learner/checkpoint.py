"""Saving the learner actor: its adapters in PEFT format, and checkpoints that continue
training exactly (adapters, heads, optimiser and RNG states, the adapter version)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.state_io import load_state, save_state
from .model import POLICY, REWARD, VALUE, PolicyValueModel, load_adapter, save_adapter

STATE_FILE = "learner_state"


def adapter_names(net: PolicyValueModel) -> list[str]:
    """What a checkpoint holds: the policy, and the value and reward adapters where present."""
    return [POLICY, *(n for n in (VALUE, REWARD) if n in net.heads)]


def save_adapters(net: PolicyValueModel, version: int, directory: str) -> str:
    """Policy adapter in PEFT format at `directory`; value / reward adapters (+ heads) in
    sub-directories named after them."""
    path = Path(directory)
    for name in adapter_names(net):
        save_adapter(net, name, version, path if name == POLICY else path / name)
    return str(path)


def save_checkpoint(learner, directory: str) -> str:
    """Everything to continue training exactly: adapters (PEFT format), value head,
    optimiser states, RNG states, the adapter version (safetensors + JSON, no pickle)."""
    core, rl, reward = learner.core, learner.rl, learner.reward
    path = Path(save_adapters(core.net, learner.version, directory))
    state = {
        "version": learner.version,
        "policy_opt": core.policy_opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if rl is not None:
        state["generator"] = rl.generator.get_state()
        if rl.value is not None:
            state["value_opt"] = rl.value.opt.state_dict()
    if reward is not None and reward.trainer is not None:
        state["reward_trainer"] = reward.trainer.state()
    save_state(state, path, STATE_FILE)
    return str(path)


def load_checkpoint(learner, directory: str) -> int:
    """Restore a `save_checkpoint` directory into `learner`; returns the adapter version it
    holds."""
    path = Path(directory)
    state = load_state(path, STATE_FILE)
    if "reward_trainer" in state and REWARD not in learner.core.net.heads:
        learner.start_reward_model(learner.spec.algo.policy_lr)  # lr comes back with the state
    core, rl = learner.core, learner.rl
    for name in adapter_names(core.net):
        load_adapter(core.net, name, path if name == POLICY else path / name)
    if rl is not None:
        rl.generator.set_state(state["generator"])
        if rl.value is not None:
            rl.value.opt.load_state_dict(state["value_opt"])
    if "reward_trainer" in state:
        learner.reward.trainer.load_state(state["reward_trainer"])
    core.policy_opt.load_state_dict(state["policy_opt"])
    torch.set_rng_state(state["torch_rng"])
    return state["version"]
