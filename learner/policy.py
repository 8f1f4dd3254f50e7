"""One policy on the learner's base model; a run trains one, or several side by side. Each has
its own adapters (its policy adapter and its value adapter where its algorithm fits one),
drawn from its own seed, its own core (optimiser, version) and RL updater: training one policy
leaves every other's weights, optimiser state and version as they were.

A policy's name is its user's (any name the config allows, `value` or `a` included); its
adapters are named by the learner (`adapter_name`), so no user name is reserved and none can
be confused by PEFT with a module's."""

from __future__ import annotations

import torch

from ..common.records import POLICY, AdapterSnapshot, ProbeResult
from ..common.specs import PolicySpec
from .core import LearnerCore
from .model import PolicyValueModel, value_adapter
from .rl import RLUpdater


def adapter_name(index: int) -> str:
    """The adapter of the learner's `index`-th policy (0: the run's first, `policy`)."""
    return POLICY if index == 0 else f"{POLICY}{index}"


def policy_adapters(adapter: str, spec: PolicySpec, rl: bool) -> tuple[str, ...]:
    """The adapters policy `spec` trains (`adapter` its own), in the order they are created:
    its own, then its value adapter where the rl stage runs an algorithm that fits one."""
    if rl and spec.algo.value_model:
        return adapter, value_adapter(adapter)
    return (adapter,)


def add_policy_adapters(net: PolicyValueModel, adapter: str, spec: PolicySpec, rl: bool
                        ) -> None:
    """Policy `spec`'s adapters on `net` beside the others', drawn as if they were the first:
    right after seeding with its seed, and in eval mode like those `net` was built with."""
    torch.manual_seed(spec.seed)
    for name in policy_adapters(adapter, spec, rl):
        net.add_adapter(name, spec.lora)
    net.eval()


class Policy:
    def __init__(self, spec: PolicySpec, adapter: str, net: PolicyValueModel, pad_id: int,
                 autocast_dtype: str | None, rl: bool) -> None:
        """A policy whose adapters (`adapter` its own) are on `net` already
        (`policy_adapters`); `rl`: with the RL updater (the rl stage)."""
        self.spec = spec
        algo = spec.algo
        self.core = LearnerCore(net, pad_id, algo.max_grad_norm, autocast_dtype,
                                algo.policy_lr, spec.name, adapter)
        self.rl = RLUpdater(self.core, spec) if rl else None

    @property
    def version(self) -> int:
        return self.core.version

    def publish(self) -> AdapterSnapshot:
        return self.core.net.snapshot(self.core.adapter, self.version)

    def check_probe(self, results: list[ProbeResult], tolerance: float) -> float:
        return self.core.check_probe(results, tolerance)

