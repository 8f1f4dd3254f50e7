"""The learner actor: the adapter stack (one base model with its LoRA adapters) and the
policies it trains on it (policy.py: each its adapters, optimiser, version and RL updater),
with the updaters composed in: RL (the rl stage, per policy), offline (sft, dpo), the reward
adapter (the rm stage, reward.model_on_learner) and MEET (the meet stage), each created when
its stage needs it. The sft, dpo, rm and meet stages train the first policy (their runs have
one); the methods that take a `policy` name default to the run's one policy, `policy`.

The Tinker-compatible service (cluster/tinker/) adds a policy per training client at runtime
(`add_client_policy`, beside the run's own, which stay) and trains it by the client's own
forward_backward and optim_step calls (client_training.py).

A policy's version is the number of updates applied to the weights it publishes: its adapter,
and in the meet stage the controls and shared LoRA its levels are served from. Only its core's
`advance` moves it (and load_checkpoint, load_client_state). A snapshot carries the version
its weights are at; a step's stats (TrainStats, OfflineStats) the version it trained on, the
policy being one past it after the step (the rm stage counts the reward adapter's own steps
the same way).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from ..common.client_records import AdamStep, ClientLoss, ForwardBackwardResult, TokenDatum
from ..common.config import LoRAConfig
from ..common.devices import actor_device, autocast_dtype, model_dtype, peak_rss_mib
from ..common.records import (
    POLICY,
    AdapterSnapshot,
    OfflineStats,
    PreferencePair,
    ProbeResult,
    ScoredRollout,
    SFTExample,
    TrainStats,
    UpdateDiverged,
)
from ..common.specs import LearnerSpec, PolicySpec
from ..common.startup import TimedStart, clock, fresh_clock
from . import client_training
from .checkpoint import (
    load_checkpoint,
    load_client_state,
    save_adapters,
    save_checkpoint,
    save_client_state,
)
from .core import LearnerCore
from .meet import SHARED, MeetUpdater
from .model import DTYPES, PolicyValueModel
from .offline import OfflineUpdater
from .policy import Policy, adapter_name, add_policy_adapters, policy_adapters
from .reward_adapter import RewardAdapter
from .rl import RLUpdater, train_together


class Learner(TimedStart):
    def __init__(self, spec: LearnerSpec) -> None:
        self.build(spec, clock(self))

    def build(self, spec: LearnerSpec, startup, base: torch.nn.Module | None = None) -> None:
        """The model and the policies of `spec`; `base`: its base model already loaded (a
        warm fleet's, `attach`), else loaded here."""
        torch.set_num_threads(spec.threads)
        self.spec = spec
        device, dtype = spec.device, spec.dtype
        if device is None:
            device, dtype = actor_device(dtype)
        self.dtype = model_dtype(dtype, device != "cpu")
        rl = "rl" in spec.stages
        first, *others = spec.policies
        # the first policy's adapters are created with the base, before any other (its seed's
        # draws); every other's beside them from its own seed
        # each policy's adapters are named by the learner, never after the policy
        self.adapter_ids = itertools.count()
        adapters = [adapter_name(next(self.adapter_ids)) for _ in spec.policies]
        net = PolicyValueModel(
            spec.model_path, first.lora, DTYPES[self.dtype], first.seed,
            policy_adapters(adapters[0], first, rl), device, spec.attn_implementation,
            spec.gradient_checkpointing, base,
        )
        for adapter, policy in zip(adapters[1:], others, strict=True):
            add_policy_adapters(net, adapter, policy, rl)
        if spec.compile:
            net.compile()
        startup.lap("learner model (base and adapters)")
        self.autocast = autocast_dtype(spec.autocast, device, self.dtype)
        self.policies = {p.name: Policy(p, adapter, net, spec.pad_token_id, self.autocast, rl)
                         for adapter, p in zip(adapters, spec.policies, strict=True)}
        self.first = self.policies[first.name]
        self.offline = OfflineUpdater(self.core)
        self.reward: RewardAdapter | None = None  # start_reward_model, load_reward_model
        self.meet: MeetUpdater | None = None  # start_meet
        startup.lap("policies (optimisers, updaters)")

    # -- a warm fleet's learner, lent to one job after another (cluster/warm.py) -------------
    def attach(self, spec: LearnerSpec) -> None:
        """Trains a new job's policies from `spec`, as a learner built from it would: the
        base model kept when the job's is the same (`same_base`), every adapter, optimiser
        and updater of the job before gone."""
        self.build(spec, fresh_clock(self), self.reusable_base(spec))

    def reusable_base(self, spec: LearnerSpec) -> torch.nn.Module | None:
        """The base model, released from its adapters, when `spec` loads the same one; else
        None (the next build loads its own)."""
        return self.net.release_base() if same_base(self.spec, spec) else None

    def detach(self) -> None:
        """The job's adapters and optimisers freed; the base model stays for the next job."""
        self.build(replace(self.spec, stages=(), policies=self.spec.policies[:1]),
                   fresh_clock(self), self.net.release_base())

    def get_policy(self, name: str) -> Policy:
        if name not in self.policies:
            raise ValueError(f"the learner has no policy {name!r}; it trains "
                             f"{', '.join(map(repr, self.policies))}")
        return self.policies[name]

    def policy_names(self) -> list[str]:
        return list(self.policies)

    # the first policy: what the sft, dpo, rm and meet stages train
    @property
    def core(self) -> LearnerCore:
        return self.first.core

    @property
    def rl(self) -> RLUpdater | None:
        return self.first.rl

    @property
    def version(self) -> int:
        return self.core.version

    @property
    def net(self) -> PolicyValueModel:
        return self.core.net

    # -- publishing and sync verification -------------------------------------------------
    def publish(self, policy: str = POLICY) -> AdapterSnapshot:
        return self.get_policy(policy).publish()

    def get_version(self, policy: str = POLICY) -> int:
        return self.get_policy(policy).version

    def check_probe(self, results: list[ProbeResult], tolerance: float,
                    policy: str = POLICY) -> float:
        """Raise SyncError unless every worker's probe log-probs match the policy's; returns
        the max gap."""
        return self.get_policy(policy).check_probe(results, tolerance)

    def check_level_probe(self, results: list[ProbeResult], tolerance: float, level: int) -> float:
        """`check_probe` of workers serving meet level `level`, against the learner's own
        control and shared adapters together (HF + PEFT, not the served copy)."""
        adapters = "+".join([*self.meet.controls.adapters(level), SHARED])
        return self.core.check_probe(
            results, tolerance, lambda batch: self.meet.level_logprobs(batch, level),
            f" ({adapters})")

    def precision(self) -> str:
        """What the updates compute in (learner.autocast, model.dtype, learner.compile)."""
        matmuls = f"{self.autocast} autocast on {self.dtype} weights" if self.autocast \
            else self.dtype
        return f"{matmuls} on {self.net.device.type}" + (", compiled" if self.spec.compile
                                                          else "")

    def peak_memory_mib(self) -> float:
        """The learner's peak memory so far: CUDA's max allocated on a GPU, else the actor
        process's peak RSS."""
        if self.net.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.net.device) / 2**20
        return peak_rss_mib()

    # -- the policies' updates ------------------------------------------------------------------
    def start_stage(self, lr: float, policy: str = POLICY) -> None:
        """A fresh policy optimiser: each stage (sft, dpo, rl) starts its own Adam moments."""
        self.get_policy(policy).core.start_stage(lr)

    def train_step(self, batches: dict[str, list[ScoredRollout]]
                   ) -> dict[str, TrainStats | UpdateDiverged]:
        """One RL update of each policy named in `batches` on its own rollouts, all of them
        in joint steps (rl.train_together; SyncError, nothing trained, for another policy's
        or stale rollouts). Each policy's stats, or its UpdateDiverged where its loss or
        gradient was not finite (its version does not move; the others' do)."""
        policies = [self.get_policy(name) for name in batches]
        results = train_together([(p.rl, batches[p.spec.name], p.version) for p in policies],
                                 self.spec.max_tokens_per_pass)
        for policy in policies:
            if isinstance(results[policy.spec.name], TrainStats):
                policy.core.advance()
        return results

    def sft_step(self, examples: list[SFTExample]) -> OfflineStats:
        stats = self.offline.sft_step(examples, self.version)
        self.core.advance()
        return stats

    def dpo_step(self, pairs: list[PreferencePair], beta: float) -> OfflineStats:
        stats = self.offline.dpo_step(pairs, beta, self.version)
        self.core.advance()
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
        self.meet = MeetUpdater(self.core, self.first.spec.lora, control, levels, size)

    def start_meet_phase(self, lr: float, with_shared: bool) -> None:
        self.meet.start_phase(lr, with_shared)

    def meet_step(self, examples: list[SFTExample]) -> OfflineStats:
        stats = self.meet.step(examples, self.version)
        self.core.advance()
        return stats

    def publish_level(self, level: int) -> AdapterSnapshot:
        return self.meet.publish_level(level, self.publish())

    def use_level(self, level: int) -> int:
        """The policy becomes level `level`'s served LoRA; returns the new version."""
        self.meet.use_level(level)
        return self.core.advance()

    # -- client policies (the Tinker service's training clients) ---------------------------------
    def add_client_policy(self, name: str, lora: LoRAConfig, seed: int) -> None:
        """A new policy `name`: its adapter beside the others, drawn from `seed` without moving
        the learner's own random state, and a fresh AdamW optimiser (each optim_step sets its
        settings; the algorithm section is the first policy's, unused)."""
        if name in self.policies:
            raise ValueError(f"the learner has a policy {name!r} already")
        spec = PolicySpec(name, self.first.spec.algo, lora, seed)
        net, adapter = self.net, adapter_name(next(self.adapter_ids))
        with torch.random.fork_rng(devices=[net.device] if net.device.type == "cuda" else []):
            add_policy_adapters(net, adapter, spec, rl=False)
        self.policies[name] = Policy(spec, adapter, net, self.spec.pad_token_id, self.autocast,
                                     rl=False)

    def remove_policy(self, name: str) -> None:
        """Policy `name`'s adapter off the model and its optimiser state gone; the run's own
        policies (built with the learner) stay."""
        policy = self.get_policy(name)
        if any(name == own.name for own in self.spec.policies):
            raise ValueError(f"policy {name!r} is one the learner was built with; only a "
                             "client's policy can be removed")
        for adapter in policy_adapters(policy.core.adapter, policy.spec, policy.rl is not None):
            self.net.remove_adapter(adapter)
        del self.policies[name]

    def forward_backward(self, calls: list[tuple[str, list[TokenDatum], ClientLoss, bool]]
                         ) -> list[ForwardBackwardResult | Exception]:
        """Client policies' forward_backward calls, each `(policy, datums, loss,
        forward_only)`, in passes of at most learner.max_tokens_per_pass tokens
        (client_training.forward_backward); each call's result, or its error."""
        return client_training.forward_backward([
            (self.get_policy(name).core, datums, loss, forward_only)
            for name, datums, loss, forward_only in calls], self.spec.max_tokens_per_pass)

    def train_cycle(self, requests: list[tuple]) -> list:
        """One clock cycle of client requests, each `("forward_backward", policy, datums,
        loss, forward_only)` or `("optim_step", policy, step)`, of distinct policies: the
        forward_backward calls in one pass, then the optimiser steps; each request's result,
        or its error, in order."""
        kinds = {"forward_backward": self.forward_backward, "optim_step": self.optim_step}
        unknown = {kind for kind, *_ in requests} - kinds.keys()
        if unknown:
            raise ValueError(f"unknown client requests {sorted(unknown)}; known: {list(kinds)}")
        results: list = [None] * len(requests)
        for kind, run in kinds.items():
            indices = [i for i, (k, *_) in enumerate(requests) if k == kind]
            if indices:
                for i, result in zip(indices, run([tuple(requests[i][1:]) for i in indices]),
                                     strict=True):
                    results[i] = result
        return results

    def optim_step(self, steps: list[tuple[str, AdamStep]]) -> list[dict[str, float] | Exception]:
        """Client policies' optim_steps, each with its own AdamW settings; each step's
        metrics, or its error (UpdateDiverged: that one's gradient was not finite)."""
        results: list[dict[str, float] | Exception] = []
        for name, step in steps:
            try:
                results.append(client_training.optim_step(self.get_policy(name).core, step))
            except (UpdateDiverged, ValueError) as exc:
                results.append(exc)
        return results

    def save_client_state(self, name: str, directory: str, optimizer: bool) -> None:
        save_client_state(self.get_policy(name), directory, optimizer)

    def load_client_state(self, name: str, directory: str, optimizer: bool) -> int:
        policy = self.get_policy(name)
        policy.core.version = load_client_state(policy, directory, optimizer)
        return policy.version

    # -- saving: one policy's adapters (and the reward adapter, with the first policy's) --------
    def save(self, directory: str, policy: str = POLICY) -> str:
        return save_adapters(self, self.get_policy(policy), directory)

    def save_checkpoint(self, directory: str, policy: str = POLICY) -> str:
        return save_checkpoint(self, self.get_policy(policy), directory)

    def load_checkpoint(self, directory: str, policy: str = POLICY) -> int:
        trained = self.get_policy(policy)
        trained.core.version = load_checkpoint(self, trained, directory)
        return trained.version


def same_base(built: LearnerSpec, asked: LearnerSpec) -> bool:
    """Whether a learner built from `built` holds the base model `asked` loads: same weights,
    precision, device, attention kernel and checkpointing."""
    keys = ("model_path", "dtype", "device", "attn_implementation", "gradient_checkpointing")
    return all(getattr(built, key) == getattr(asked, key) for key in keys)


def train_one(learner: Learner, scored: list[ScoredRollout], policy: str = POLICY
              ) -> TrainStats:
    """One policy's RL update alone (benches, checks): its stats, or its UpdateDiverged
    raised."""
    result = learner.train_step({policy: scored})[policy]
    if isinstance(result, UpdateDiverged):
        raise result
    return result
