"""Saving the learner actor, one policy at a time: its adapters in PEFT format, and checkpoints
that continue its training exactly (adapters, heads, optimiser and RNG states, its version).
The reward adapter, one per learner, is saved with the first policy's."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common.state_io import load_state, save_state
from .model import REWARD, VALUE, load_adapter, save_adapter

STATE_FILE = "learner_state"


def saved_adapters(learner, policy) -> dict[str, str]:
    """What a policy's directory holds, each adapter by the sub-directory it is in: the
    policy's own at the top, its value adapter in `value` where it has one, and with the first
    policy the reward adapter in `reward` where the learner holds one. The same layout whatever
    the policy's name, so a policy's directory reads as a one-policy run's."""
    core, heads = policy.core, policy.core.net.heads
    adapters = {core.name: ""}
    if core.value_name in heads:
        adapters[core.value_name] = VALUE
    if policy is learner.first and REWARD in heads:
        adapters[REWARD] = REWARD
    return adapters


def save_adapters(learner, policy, directory: str) -> str:
    """`policy`'s adapters (+ heads) in PEFT format at `directory` (`saved_adapters`)."""
    path = Path(directory)
    for name, sub in saved_adapters(learner, policy).items():
        save_adapter(policy.core.net, name, policy.version, path / sub)
    return str(path)


def save_checkpoint(learner, policy, directory: str) -> str:
    """Everything to continue training `policy` exactly: adapters (PEFT format), value head,
    optimiser states, RNG states, its version (safetensors + JSON, no pickle)."""
    core, rl = policy.core, policy.rl
    reward = learner.reward if policy is learner.first else None
    path = Path(save_adapters(learner, policy, directory))
    state = {
        "version": core.version,
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


def load_checkpoint(learner, policy, directory: str) -> int:
    """Restore a `save_checkpoint` directory into `policy` of `learner`; returns the version
    it holds."""
    path = Path(directory)
    state = load_state(path, STATE_FILE)
    core, rl = policy.core, policy.rl
    if "reward_trainer" in state and REWARD not in core.net.heads:
        learner.start_reward_model(policy.spec.algo.policy_lr)  # lr comes back with the state
    for name, sub in saved_adapters(learner, policy).items():
        load_adapter(core.net, name, path / sub)
    if rl is not None:
        rl.generator.set_state(state["generator"])
        if rl.value is not None:
            rl.value.opt.load_state_dict(state["value_opt"])
    if "reward_trainer" in state:
        learner.reward.trainer.load_state(state["reward_trainer"])
    core.policy_opt.load_state_dict(state["policy_opt"])
    torch.set_rng_state(state["torch_rng"])
    return state["version"]
