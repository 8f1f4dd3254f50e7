"""The actors of a run and keeping them in step: joining Ray, the groups of a run (learner,
rollout workers, reward actors) placed and started, publishing the adapter to every worker
with a verified sync, and bringing a restarted rollout worker back before it works again."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ..common.logs import library_env, log_level
from ..common.records import ProbeResult, Prompt, Rollout
from ..common.specs import EngineSpec, LearnerSpec
from ..reward.pool import RewardSpec
from ..rollout.worker import POLICY, level_slot
from .actor_group import ActorGroup, Calls, Placement, place
from .config import TrainConfig
from .specs import group_specs, sync_tolerance

# Zero-copy tensors through the object store: the adapter reaches every worker without copies.
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


def connect_ray(cfg: TrainConfig) -> bool:
    """Join $RAY_ADDRESS / ray.address (a `ray job submit` job sets it), else start a local
    cluster bound to loopback. True if we started it. The actors get the libraries' log level
    (common/logs.py) with the other variables."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    env = {**RUNTIME_ENV["env_vars"], **library_env()}
    driver_logs = {"logging_level": logging.getLevelName(log_level())}  # Ray's, in this process
    if address:
        # A submitted job's runtime_env (deploy/runtime_env.yaml) already sets these in our
        # environment, and Ray refuses to merge duplicate keys: add only what is missing.
        missing = {k: v for k, v in env.items() if k not in os.environ}
        ray.init(address=address, runtime_env={"env_vars": missing} if missing else None,
                 **driver_logs)
        return False
    ray.init(
        num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
        _node_ip_address="127.0.0.1", **driver_logs,
    )
    return True


def shard(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal shards (every item in exactly one shard)."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def check_exactly_once(prompts: list[Prompt], rollouts: list[Rollout], n: int) -> None:
    """Every prompt of the batch came back with exactly n samples; nothing lost or doubled."""
    counts: dict[int, int] = {}
    for r in rollouts:
        counts[r.prompt.index] = counts.get(r.prompt.index, 0) + 1
    expected = {p.index: n for p in prompts}
    if counts != expected:
        wrong = sorted(i for i in expected.keys() | counts.keys() if counts.get(i) != n)
        raise RuntimeError(f"rollouts do not match the prompts (n={n} each) for {wrong[:10]}")


def fixed_cluster(cfg: TrainConfig) -> bool:
    """A local cluster (no address to join): no autoscaler will add what is missing."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


@dataclass(frozen=True)
class SyncFigures:
    """A verified sync: publish -> all-serving seconds, the largest probe log-prob gap, and
    the adapter version each worker reported."""

    seconds: float
    probe_gap: float
    versions: dict[int, int]  # worker -> adapter version


@dataclass
class AdapterSync:
    """A publish under way: when it started, the workers' swaps and their probes."""

    start: float
    loads: Calls
    probes: Calls


class Fleet:
    """The run's actor groups, the adapter the rollout workers must serve, and bringing a
    restarted rollout worker back to it (verified) before it works again."""

    def __init__(
        self, cfg: TrainConfig, placement: Placement, learner: ActorGroup, rollout: ActorGroup,
        reward: ActorGroup, probe_ids: list[list[int]],
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.groups = [learner, rollout, reward]
        self.learner = learner.actors[0]
        self.rollout = rollout
        self.reward = reward
        self.probe_ids = probe_ids
        self.snapshot = None  # ObjectRef of the adapter the workers must serve
        self.level_snapshots: dict[int, object] = {}  # meet level -> ObjectRef, served beside
        self.verified: SyncFigures | None = None  # the last verified sync of the policy
        rollout.revive = self.resync_worker

    def resync_worker(self, i: int) -> None:
        """The current adapters (policy, meet levels) on restarted worker i, verified with the
        probe."""
        import ray

        worker = self.rollout.actors[i]
        if self.snapshot is not None:
            # Published again: in async mode the learner may have moved past the last snapshot
            # while the worker died (this call waits for its update), and the probe is checked
            # against the learner's current weights.
            self.snapshot = self.learner.publish.remote()
        served = [(None, self.snapshot)] if self.snapshot is not None else []
        for level, snapshot in served + list(self.level_snapshots.items()):
            slot = POLICY if level is None else level_slot(level)
            ray.get(worker.load_snapshot.remote(snapshot, slot))
            probe = ray.get(worker.probe.remote(
                self.probe_ids, self.cfg.rollout.max_new_tokens, slot))
            self.check_served([probe], level)

    def check_served(self, probes: list[ProbeResult], level: int | None) -> float:
        """The learner's check of the workers' probes of the policy (`level` None) or of meet
        level `level` (its control + shared adapters); returns the max log-prob gap."""
        import ray

        tolerance = sync_tolerance(self.cfg)
        check = (self.learner.check_probe.remote(probes, tolerance) if level is None
                 else self.learner.check_level_probe.remote(probes, tolerance, level))
        return ray.get(check)

    # -- adapter publishing ---------------------------------------------------------------------
    def sync_adapter(self) -> SyncFigures:
        """Publish once, hot-swap on every worker, verify with the probe; nothing to do when
        the workers already serve the learner's version, verified (a restarted worker is
        brought back by `resync_worker`). Returns the verified sync's figures."""
        import ray

        version = ray.get(self.learner.get_version.remote())
        if self.verified is not None and set(self.verified.versions.values()) == {version}:
            return self.verified
        return self.finish_sync(self.start_sync())

    def start_sync(self) -> AdapterSync:
        """`sync_adapter` without waiting: each worker swaps the adapter in after the requests
        already queued on it (the fleet never pauses) and then runs the probe."""
        start = time.perf_counter()
        self.snapshot = self.learner.publish.remote()  # stored once in the object store
        loads = self.rollout.submit(lambda w, _: w.load_snapshot.remote(self.snapshot))
        max_tokens = self.cfg.rollout.max_new_tokens
        probes = self.rollout.submit(lambda w, _: w.probe.remote(self.probe_ids, max_tokens))
        return AdapterSync(start, loads, probes)

    def finish_sync(self, sync: AdapterSync) -> SyncFigures:
        """Waits for a started sync and verifies its probes against the learner, which must
        still hold the published version (else SyncError). Returns as `sync_adapter`."""
        self.rollout.collect(sync.loads)
        seconds = time.perf_counter() - sync.start
        probes = self.rollout.collect(sync.probes)
        gap = self.check_served(probes, None)
        self.verified = SyncFigures(seconds, gap, {p.worker_id: p.adapter_version for p in probes})
        return self.verified

    def sync_levels(self, levels: int) -> float:
        """Publish every meet level's adapter once, load all of them beside the policy on every
        worker, verify each with the probe against the learner's control + shared adapters.
        Returns the max probe log-prob gap."""
        max_tokens, worst = self.cfg.rollout.max_new_tokens, 0.0
        for level in range(levels):
            slot = level_slot(level)
            self.level_snapshots[level] = snapshot = self.learner.publish_level.remote(level)
            self.rollout.call(lambda w, _, ref=snapshot, slot=slot: w.load_snapshot.remote(
                ref, slot))
            probes = self.rollout.call(lambda w, _, slot=slot: w.probe.remote(
                self.probe_ids, max_tokens, slot))
            worst = max(worst, self.check_served(probes, level))
        return worst

    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int,
        slot: str = POLICY,
    ) -> list[Rollout]:
        calls = self.submit_generate(prompts, n=n, temperature=temperature, seed=seed, slot=slot)
        return self.collect_generate(prompts, calls, n)

    def submit_generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int,
        slot: str = POLICY,
    ) -> Calls:
        """`generate` without waiting: the prompts sharded over the workers, queued on each
        behind its earlier requests (and adapter swaps); `slot`: the served adapter to use."""
        if not self.rollout.actors:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "rollout workers")
        rollout = self.cfg.rollout
        parts = shard(prompts, len(self.rollout.actors))
        return self.rollout.submit(
            lambda w, part: w.generate.remote(
                part, n=n, temperature=temperature, max_tokens=rollout.max_new_tokens, seed=seed,
                stop=rollout.stop, stop_token_ids=rollout.stop_token_ids, slot=slot,
            ),
            {i: part for i, part in enumerate(parts) if part},  # fewer prompts than workers
        )

    def collect_generate(self, prompts: list[Prompt], calls: Calls, n: int) -> list[Rollout]:
        rollouts = [r for part in self.rollout.collect(calls) for r in part]
        check_exactly_once(prompts, rollouts, n)
        return rollouts

    def kill(self) -> None:
        for group in self.groups:
            group.kill()
        self.placement.remove()


def start_fleet(
    cfg: TrainConfig, learner: LearnerSpec, engine: EngineSpec, reward: RewardSpec,
    probe_ids: list[list[int]],
) -> Fleet:
    """Places and starts the groups of `group_specs`, each actor built from its spec; returns
    once every actor is up (a construction error, e.g. a vLLM start failure, raises here, the
    actors stopped)."""
    import ray

    learner_group, rollout_group, reward_group = group_specs(cfg)
    placement = place([learner_group, rollout_group, reward_group], cfg.placement.strategy,
                      cfg.placement.timeout_s, fixed_cluster(cfg))
    fleet = Fleet(
        cfg, placement, ActorGroup.start(learner_group, placement, learner),
        ActorGroup.start(rollout_group, placement, engine),
        ActorGroup.start(reward_group, placement, reward), probe_ids,
    )
    try:
        ray.get([ref for group in fleet.groups for ref in group.ready()])
    except BaseException:
        fleet.kill()
        raise
    return fleet
