"""Saving the learner actor, one policy at a time: its adapters in PEFT format, and checkpoints
that continue its training exactly (adapters, heads, optimiser and RNG states, its version).
The reward adapter, one per learner, is saved with the first policy's. A client's policy (the
Tinker service's) saves its state alone: adapter, version, optimiser state if asked for."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..common.state_io import load_state, save_state
from .model import REWARD, VALUE, check_adapter_fits, load_adapter, save_adapter

STATE_FILE = "learner_state"


def saved_adapters(learner, policy) -> dict[str, str]:
    """What a policy's directory holds, each adapter by the sub-directory it is in: the
    policy's own at the top, its value adapter in `value` where it has one, and with the first
    policy the reward adapter in `reward` where the learner holds one. The same layout whatever
    the policy's name, so a policy's directory reads as a one-policy run's."""
    core, heads = policy.core, policy.core.net.heads
    adapters = {core.adapter: ""}
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


def save_client_state(policy, directory: str, optimizer: bool) -> None:
    """`policy`'s adapter (PEFT format), version and, with `optimizer`, its AdamW state at
    `directory`, replacing what is there. Written to a sibling directory renamed into place,
    so `directory` never holds a half-written state."""
    core, path = policy.core, Path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))
    try:
        save_adapter(core.net, core.adapter, core.version, staging)
        state = {"version": core.version}
        if optimizer:
            state["policy_opt"] = core.policy_opt.state_dict()
        save_state(state, staging, STATE_FILE)
        if path.exists():
            replaced = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            path.rename(replaced / path.name)
            staging.rename(path)
            shutil.rmtree(replaced)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_client_state(policy, directory: str, optimizer: bool) -> int:
    """Restore a `save_client_state` directory into `policy`, with its AdamW state
    (`optimizer`) or a fresh optimiser; returns the version it holds. A ValueError where the
    saved adapter's LoRA settings differ from the policy's, or the optimiser state is asked
    for and was not saved."""
    core, path = policy.core, Path(directory)
    if not (path / f"{STATE_FILE}.json").exists():
        raise ValueError(f"{path} holds no saved client state")
    check_adapter_fits(core.net, core.adapter, path, core.name)
    state = load_state(path, STATE_FILE)
    if optimizer and "policy_opt" not in state:
        raise ValueError(f"{path} was saved without its optimizer state; load it without")
    load_adapter(core.net, core.adapter, path)
    core.start_stage(policy.spec.algo.policy_lr)  # each optim_step sets its own lr
    core.policy_opt.zero_grad(set_to_none=True)  # gradients summed before the load are void
    if optimizer:
        core.policy_opt.load_state_dict(state["policy_opt"])
    return state["version"]
