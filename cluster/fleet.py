"""The actors of a run and keeping them in step: joining Ray, the groups of a run (learner,
rollout workers, reward actors) placed and started, publishing the adapter to every worker
with a verified sync, and bringing a restarted rollout worker back before it works again."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..common.config import RolloutConfig
from ..common.logs import library_env, log_level
from ..common.records import POLICY, GenerationRequest, ProbeResult, Prompt, Rollout
from ..common.specs import EngineSpec, LearnerSpec
from ..reward.pool import RewardSpec
from ..rollout.worker import level_slot
from .actor_group import ActorGroup, Calls, GroupSpec, Placement, place, ray_wait
from .config import TrainConfig
from .local_head import KILL_GRACE_ENV
from .specs import fixed_cluster, group_specs, learner_engine, sync_tolerance

# Zero-copy tensors through the object store: the adapter reaches every worker without copies.
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


# Ray's switch for a one-machine cluster (on by default on macOS and Windows): the node takes
# the loopback address, so every port of the cluster we start (GCS, raylets, agents, metrics)
# listens on 127.0.0.1 only, not on the machine's network address.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Makes the cluster about to be started keep to loopback: Ray reads the switch from the
    environment in each process it starts, and from its constant in this one (read at import)."""
    from ray._private import ray_constants

    os.environ[LOOPBACK_ONLY] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


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
    loopback_only()
    start_local_ray(env, num_cpus=cfg.ray.num_cpus, **driver_logs)
    return True


def start_local_ray(env: dict[str, str], **init_kwargs) -> None:
    """A new local cluster (address="local": never one Ray would otherwise find running on
    this machine, another user's `ray start` or another run's cluster) whose processes have
    `env`. Given to its raylet at its start rather than as the job's runtime_env: the workers
    Ray starts ahead of time then match the job, so an actor starts in one of them (0.2 s)
    instead of a new process (0.8 s); with KILL_GRACE_ENV. This process's own environment is
    left as it was."""
    import ray

    env = {**env, **KILL_GRACE_ENV}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        ray.init(address="local", include_dashboard=False, **init_kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


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


@dataclass(frozen=True)
class SyncFigures:
    """A verified sync: publish -> all-serving seconds, the largest probe log-prob gap, and
    the adapter version each worker reported."""

    seconds: float
    probe_gap: float
    versions: dict[int, int]  # worker -> adapter version


@dataclass
class AdapterSync:
    """A publish of one policy under way: when it started, the workers' swaps and probes."""

    policy: str
    start: float
    loads: Calls
    probes: Calls


@dataclass
class Generation:
    """Generation requests under way: one `generate_requests` call per worker carries its
    shard of every request, so an engine batches across the policies' adapters."""

    requests: list[GenerationRequest]
    calls: Calls
    results: list[list[Rollout]] | None = None  # per request, once collected


def generation_request(
    prompts: list[Prompt], rollout: RolloutConfig, *, n: int, temperature: float, seed: int,
    slot: str = POLICY,
) -> GenerationRequest:
    """n samples of each prompt from the adapter of `slot`, with rollout's length and stops."""
    return GenerationRequest(
        slot, prompts, n=n, temperature=temperature, max_tokens=rollout.max_new_tokens,
        seed=seed, stop=tuple(rollout.stop), stop_token_ids=tuple(rollout.stop_token_ids),
    )


class Fleet:
    """The run's actor groups, the adapters the rollout workers must serve (each policy's,
    and the meet levels'), and bringing a restarted rollout worker back to all of them
    (verified) before it works again."""

    def __init__(
        self, cfg: TrainConfig, placement: Placement, learner: ActorGroup, rollout: ActorGroup,
        reward: ActorGroup, probe_ids: dict[str, list[list[int]]],
    ) -> None:
        """probe_ids: each policy's probe prompts (the meet levels are probed with the first
        policy's)."""
        self.cfg = cfg
        self.placement = placement
        self.groups = [learner, rollout, reward]
        self.learner = learner.actors[0]
        self.rollout = rollout
        self.reward = reward
        self.probe_ids = probe_ids
        self.snapshots: dict[str, object] = {}  # policy -> ObjectRef of what workers must serve
        self.level_snapshots: dict[int, object] = {}  # meet level -> ObjectRef, served beside
        self.verified: dict[str, SyncFigures] = {}  # each policy's last verified sync
        self.startup: dict[str, dict[str, float]] = {}  # each actor's (start_fleet)
        rollout.revive = self.resync_worker

    def resync_worker(self, i: int) -> None:
        """Every policy's current adapter and the meet levels' on restarted worker i, each
        verified with the probe."""
        import ray

        worker = self.rollout.actors[i]
        for policy in self.snapshots:
            # Published again: in async mode the learner may have moved past the last snapshot
            # while the worker died (this call waits for its update), and the probe is checked
            # against the learner's current weights.
            self.snapshots[policy] = self.learner.publish.remote(policy)
            ray.get(worker.load_snapshot.remote(self.snapshots[policy], policy))
            self.check_served([ray.get(worker.probe.remote(
                self.probe_ids[policy], self.cfg.rollout.max_new_tokens, policy))], policy)
        for level, snapshot in self.level_snapshots.items():
            ray.get(worker.load_snapshot.remote(snapshot, level_slot(level)))
            probe = ray.get(worker.probe.remote(
                self.level_probe_ids, self.cfg.rollout.max_new_tokens, level_slot(level)))
            self.check_served([probe], POLICY, level)

    @property
    def level_probe_ids(self) -> list[list[int]]:
        return next(iter(self.probe_ids.values()))

    def check_served(self, probes: list[ProbeResult], policy: str,
                     level: int | None = None) -> float:
        """The learner's check of the workers' probes of `policy`, or of meet level `level`
        (its control + shared adapters); returns the max log-prob gap."""
        import ray

        tolerance = sync_tolerance(self.cfg)
        check = (self.learner.check_probe.remote(probes, tolerance, policy) if level is None
                 else self.learner.check_level_probe.remote(probes, tolerance, level))
        return ray.get(check)

    def forget(self, policy: str) -> None:
        """A stopped policy: restarted workers no longer get it back."""
        self.snapshots.pop(policy, None)
        self.verified.pop(policy, None)

    # -- adapter publishing ---------------------------------------------------------------------
    def sync_adapter(self, policy: str = POLICY) -> SyncFigures:
        """Publish `policy` once, hot-swap it on every worker, verify with the probe; nothing
        to do when the workers already serve the learner's version, verified (a restarted
        worker is brought back by `resync_worker`). Returns the verified sync's figures."""
        import ray

        version = ray.get(self.learner.get_version.remote(policy))
        verified = self.verified.get(policy)
        if verified is not None and set(verified.versions.values()) == {version}:
            return verified
        return self.finish_sync(self.start_sync(policy))

    def start_sync(self, policy: str = POLICY) -> AdapterSync:
        """`sync_adapter` without waiting: each worker swaps the adapter in after the requests
        already queued on it (the fleet never pauses) and then runs the probe."""
        start = time.perf_counter()
        rollout = self.rollout
        # stored once in the object store, for the workers apart from the learner; a
        # colocated engine (None) takes it from the learner in its own process
        snapshot = self.learner.publish.remote(policy) if rollout.own else None
        self.snapshots[policy] = snapshot
        loads = rollout.submit("load_snapshot", lambda ref: (ref, policy), {
            i: None if i < rollout.shared else snapshot for i in range(len(rollout.actors))})
        max_tokens, probe_ids = self.cfg.rollout.max_new_tokens, self.probe_ids[policy]
        probes = self.rollout.submit("probe", lambda _: (probe_ids, max_tokens, policy))
        return AdapterSync(policy, start, loads, probes)

    def finish_sync(self, sync: AdapterSync) -> SyncFigures:
        """Waits for a started sync and verifies its probes against the learner, which must
        still hold the published version (else SyncError). Returns as `sync_adapter`."""
        self.rollout.collect(sync.loads)
        seconds = time.perf_counter() - sync.start
        probes = self.rollout.collect(sync.probes)
        gap = self.check_served(probes, sync.policy)
        self.verified[sync.policy] = figures = SyncFigures(
            seconds, gap, {p.worker_id: p.adapter_version for p in probes})
        return figures

    def sync_levels(self, levels: int) -> float:
        """Publish every meet level's adapter once, load all of them beside the policy on every
        worker, verify each with the probe against the learner's control + shared adapters.
        Returns the max probe log-prob gap."""
        max_tokens, worst = self.cfg.rollout.max_new_tokens, 0.0
        for level in range(levels):
            slot = level_slot(level)
            self.level_snapshots[level] = snapshot = self.learner.publish_level.remote(level)
            self.rollout.call("load_snapshot", lambda _, ref=snapshot, slot=slot: (ref, slot))
            probes = self.rollout.call("probe", lambda _, slot=slot: (
                self.level_probe_ids, max_tokens, slot))
            worst = max(worst, self.check_served(probes, POLICY, level))
        return worst

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int,
        slot: str = POLICY, rollout: RolloutConfig | None = None,
    ) -> list[Rollout]:
        """n samples of each prompt from the adapter of `slot`, with `rollout`'s length and
        stops (None: the run's)."""
        request = generation_request(prompts, rollout or self.cfg.rollout, n=n,
                                     temperature=temperature, seed=seed, slot=slot)
        return self.collect_requests(self.submit_requests([request]))[0]

    def submit_requests(self, requests: list[GenerationRequest]) -> Generation:
        """The requests without waiting: each one's prompts sharded over the workers, one call
        per worker queued behind its earlier requests (and adapter swaps)."""
        if not self.rollout.actors:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "rollout workers")
        workers = len(self.rollout.actors)
        shards = [shard(request.prompts, workers) for request in requests]
        parts = {i: [replace(request, prompts=parts[i])
                     for request, parts in zip(requests, shards, strict=True)]
                 for i in range(workers)}
        busy = {i: part for i, part in parts.items() if any(r.prompts for r in part)}
        return Generation(requests, self.rollout.submit(
            "generate_requests", lambda part: (part,), busy))

    def collect_requests(self, generation: Generation, wait: Callable = ray_wait
                         ) -> list[list[Rollout]]:
        """Each request's rollouts, every prompt checked to have come back exactly n times;
        `wait` as ActorGroup.collect's."""
        if generation.results is None:
            results = [[] for _ in generation.requests]
            for part in self.rollout.collect(generation.calls, wait):
                for rollouts, out in zip(part, results, strict=True):
                    out += rollouts
            for request, rollouts in zip(generation.requests, results, strict=True):
                check_exactly_once(request.prompts, rollouts, request.n)
            generation.results = results
        return generation.results

    def kill(self) -> None:
        for group in self.groups:
            group.kill()
        self.placement.remove()


def start_fleet(
    cfg: TrainConfig, learner: LearnerSpec, engine: EngineSpec, reward: RewardSpec,
    probe_ids: dict[str, list[list[int]]], lend: Callable | None = None,
) -> Fleet:
    """Places and starts the groups of `group_specs`, each actor built from its spec; returns
    once every actor is up (a construction error, e.g. a vLLM start failure, raises here, the
    actors stopped). `lend`: a warm fleet's (cluster/warm.py WarmLease.lend), which gives the
    learner and rollout groups from its running actors; the reward actors start here."""
    import ray

    learner_group, rollout_group, reward_group = group_specs(cfg)
    submitted = time.time()
    own_engine = learner_engine(cfg, engine)
    if lend is None:
        placement = place([learner_group, rollout_group, reward_group], cfg.placement.strategy,
                          cfg.placement.timeout_s, fixed_cluster(cfg))
        learners, rollout = start_engines_and_learner(
            [learner_group, rollout_group], placement, learner, engine, own_engine)
    else:
        learners, rollout = lend([learner_group, rollout_group], learner, engine, own_engine)
        placement = place([reward_group], cfg.placement.strategy, cfg.placement.timeout_s,
                          fixed_cluster(cfg))
    fleet = Fleet(cfg, placement, learners, rollout,
                  ActorGroup.start(reward_group, placement, reward), probe_ids)
    try:
        ray.get([ref for group in fleet.groups for ref in group.ready()])
        fleet.startup = actor_startup(fleet.groups, submitted)
    except BaseException:
        fleet.kill()
        raise
    return fleet


def start_engines_and_learner(
    groups: list[GroupSpec], placement: Placement, learner: LearnerSpec, engine: EngineSpec,
    own_engine: EngineSpec | None, lifetime: str | None = None,
) -> tuple[ActorGroup, ActorGroup]:
    """The learner and rollout groups (`groups`) started in `placement`, without waiting;
    `own_engine`: the learner's colocated engine (it is then rollout worker 0), if any;
    `lifetime` as ActorGroup.start's."""
    learner_group, rollout_group = groups
    learners = ActorGroup.start(learner_group, placement, learner,
                                *([own_engine] if own_engine else []), lifetime=lifetime)
    rollout = ActorGroup.start(rollout_group, placement, engine, lifetime=lifetime,
                               shared=tuple(learners.actors) if own_engine else ())
    return learners, rollout


# an actor's wait before its phases: for its process, or for the warm fleet's to be checked
WAIT = {False: "process (placement, worker start, imports)", True: "warm actor reached"}


def actor_startup(groups: list[ActorGroup], submitted: float) -> dict[str, dict[str, float]]:
    """Each actor's start, by name: the wait for its process (placement, Ray starting the
    worker, the imports of its class's module), then the phases its construction timed."""
    import ray

    own = [(group.spec.name.format(i=group.shared + i), actor, group.lent)
           for group in groups for i, actor in enumerate(group.own)]
    reports = ray.get([actor.startup_phases.remote() for _, actor, _ in own])
    return {name: {WAIT[lent]: started - submitted, **phases}
            for (name, _, lent), (started, phases) in zip(own, reports, strict=True)}
