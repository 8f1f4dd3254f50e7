"""A warm fleet: a local Ray cluster with the learner (base model loaded) and the vLLM engines
up, kept between jobs (`lorafleet up`, `lorafleet down`). A job without ray.address joins it
(ray.warm_fleet=auto) and borrows its actors: they take the job's specs (`attach`: the same
base model and engine, every adapter, optimiser and slot of the job before gone) and are given
back when it ends (`detach`); the job starts its own reward actors beside them. One job at a
time holds the fleet (a lock file); a job whose specs the fleet cannot serve, or that finds it
held or its actors dead, is refused with what to do.

The warm fleet's directory (`warm_dir`) holds its state (`fleet.json`: the head's address and
process, its actors, what they were built from), the lock, and the head's log."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..common.cache import cache_root
from ..common.logs import library_env
from ..common.specs import EngineSpec, LearnerSpec
from ..rollout.worker import engine_fits
from .actor_group import ActorGroup, GroupSpec, Placement, place
from .config import TrainConfig
from .fleet import (
    LOOPBACK_ONLY,
    RUNTIME_ENV,
    connect_ray,
    loopback_only,
    start_engines_and_learner,
)
from .local_head import AUTH_ENV, start_head, stop_head
from .specs import group_specs, learner_engine, run_specs

NAMESPACE = "lorafleet-warm"  # the warm actors' Ray namespace (a job's own are anonymous)
ATTACH_TIMEOUT_S = 120.0  # a warm actor Ray is restarting may take this long to answer
STATE, LOCK, LOG = "fleet.json", "fleet.lock", "ray-head.log"


class WarmFleetError(RuntimeError):
    """The warm fleet cannot take this job (held by another, built for other specs, an actor
    dead): says why and what to do."""


def warm_dir() -> Path:
    """Where the warm fleet keeps its state: $LORAFLEET_WARM_DIR, else under the cache."""
    return Path(os.environ.get("LORAFLEET_WARM_DIR") or cache_root() / "warm-fleet")


@dataclass
class WarmState:
    """What `lorafleet up` started, as fleet.json holds it."""

    address: str  # the head's GCS address (ray.init's)
    dashboard: str
    pid: int  # `ray start --head --block`'s process (its group is the whole cluster)
    temp_dir: str  # Ray's session directory
    placement: str  # the detached placement group's id (hex)
    first_bundle: dict[str, int]  # role -> its first actor's bundle
    actors: dict[str, list[str]]  # role -> the actors' names in NAMESPACE
    groups: dict[str, dict]  # role -> {"class", "size", "bundle"}: what the actors are
    engine: dict  # the rollout workers' EngineSpec
    colocated_engine: dict | None  # the learner's own engine (placement colocated), if any
    learner: dict  # the LearnerSpec the learner was built from
    command: str  # the `lorafleet up` command line
    started: float = field(default_factory=time.time)

    @classmethod
    def read(cls, directory: Path) -> WarmState | None:
        path = directory / STATE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, directory: Path) -> None:
        (directory / STATE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    def alive(self) -> bool:
        """Whether the head's process still runs."""
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def spec_dict(spec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def engine_from(fields: dict) -> EngineSpec:
    return EngineSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def group_shape(spec: GroupSpec) -> dict:
    return {"class": spec.actor_class.__name__, "size": spec.size,
            "bundle": spec.resources.bundle()}


def shape_problems(state: WarmState, groups: list[GroupSpec], engine: EngineSpec | None,
                   colocated_engine: EngineSpec | None, learner: LearnerSpec) -> list[str]:
    """What the warm fleet lacks to run a job of these groups and specs as its own fleet
    would; [] when it serves it exactly so."""
    problems = []
    for spec in groups:
        have, want = state.groups.get(spec.role), group_shape(spec)
        if have != want:
            problems.append(f"{spec.role} actors: the warm fleet has {have}, the job asks {want}")
    rollout_engine = engine if state.actors.get("rollout") else None  # none beside it: unused
    for name, built, asked in (("rollout engines", state.engine, rollout_engine),
                               ("the learner's engine", state.colocated_engine, colocated_engine)):
        if asked is not None and built is not None:
            problems += [f"{name}: {p}" for p in engine_fits(engine_from(built), asked)]
    if learner.device != state.learner["device"]:
        problems.append(f"learner device: the warm fleet's is {state.learner['device']!r}, "
                        f"the job asks {learner.device!r}")
    return problems


class WarmLease:
    """The warm fleet held by this job: Ray joined, the lock taken, until `release`."""

    def __init__(self, state: WarmState, lock) -> None:
        self.state, self.lock = state, lock
        self.lent: list[ActorGroup] = []

    def lend(self, groups: list[GroupSpec], learner: LearnerSpec, engine: EngineSpec | None,
             colocated_engine: EngineSpec | None) -> tuple[ActorGroup, ActorGroup]:
        """The learner and rollout groups of the job (`groups`: the job's learner and rollout
        GroupSpecs) made of the warm actors, each attached to the job's specs."""
        import ray
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        problems = shape_problems(self.state, groups, engine, colocated_engine, learner)
        if problems:
            raise WarmFleetError(
                f"the warm fleet (`{self.state.command}`) cannot run this job as its own "
                "fleet would: " + "; ".join(problems) + ". Start the job with "
                "its own fleet (ray.warm_fleet=off), or `lorafleet down` and `lorafleet up` "
                "with this job's config")
        handles = {role: [ray.get_actor(name, namespace=NAMESPACE) for name in names]
                   for role, names in self.state.actors.items()}
        self.check_alive(handles)
        group = PlacementGroup(PlacementGroupID(bytes.fromhex(self.state.placement)))
        placement = Placement(group, self.state.first_bundle, ATTACH_TIMEOUT_S)
        learner_spec, rollout_spec = groups
        [learner_actor] = handles["learner"]
        shared = [learner_actor] if colocated_engine is not None else []
        learners = ActorGroup(learner_spec, [learner_actor], placement)
        rollout = ActorGroup(rollout_spec, shared + handles["rollout"], placement, len(shared))
        self.lent = [learners, rollout]
        for group in self.lent:
            group.lent = True
        ray.get([learner_actor.attach.remote(learner, *(
            [colocated_engine] if colocated_engine is not None else []))]
            + [worker.attach.remote(engine) for worker in handles["rollout"]])
        return learners, rollout

    def check_alive(self, handles: dict[str, list]) -> None:
        """Every warm actor answers, one Ray restarts waited for at most ATTACH_TIMEOUT_S;
        a dead one is reported with the way out."""
        import ray

        named = [(name, handle) for role, names in self.state.actors.items()
                 for name, handle in zip(names, handles[role], strict=True)]
        pending = {name: handle.__ray_ready__.remote() for name, handle in named}
        done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=2.0)
        if len(done) < len(pending):
            print(f"waiting up to {ATTACH_TIMEOUT_S:g} s for the warm fleet's actors "
                  "(Ray is restarting one)", flush=True)
        for name, ref in pending.items():
            try:
                ray.get(ref, timeout=ATTACH_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                raise WarmFleetError(
                    f"the warm fleet's actor {name} is dead or does not answer "
                    f"({str(exc).splitlines()[0][:160]}): `lorafleet down` then `lorafleet "
                    "up` to start it again, or run with ray.warm_fleet=off") from exc

    def release(self) -> None:
        """The warm actors detached from the job (its adapters freed), the lock given back.
        An actor that died with the job is left for the next attach to report."""
        import ray

        actors = [self.lent[0].actors[0], *self.lent[1].own] if self.lent else []
        try:
            ray.get([actor.detach.remote() for actor in actors], timeout=ATTACH_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            print(f"warm fleet: an actor did not detach ({str(exc).splitlines()[0][:160]})",
                  flush=True)
        finally:
            self.lent = []
            self.lock.close()


def join(cfg: TrainConfig) -> WarmLease | None:
    """The warm fleet, Ray joined and held for this job, if the job runs on one: no
    ray.address, ray.warm_fleet=auto, and `lorafleet up` started one that still runs (a
    stale state file, its head gone, is removed). None: the job starts its own fleet."""
    import ray

    if (cfg.ray.address or os.environ.get("RAY_ADDRESS") or cfg.ray.warm_fleet == "off"
            or ray.is_initialized()):  # a process on a cluster already (a bench, the tests)
        return None
    directory = warm_dir()
    state = WarmState.read(directory)
    if state is None:
        return None
    if not state.alive():
        print(f"warm fleet: its head (pid {state.pid}) is gone; removing {directory / STATE} "
              "and starting this job's own fleet", flush=True)
        (directory / STATE).unlink(missing_ok=True)
        return None
    if cfg.ray.num_cpus is not None:
        raise WarmFleetError(f"ray.num_cpus={cfg.ray.num_cpus} sizes a cluster the job starts, "
                             f"but it joins the warm fleet at {state.address}: drop the key, "
                             "or run with ray.warm_fleet=off")
    lock = open(directory / LOCK, "a+")  # noqa: SIM115 (held until release)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise WarmFleetError(f"the warm fleet at {state.address} runs another job ({holder}); "
                             "wait for it to end, or run this one with its own fleet "
                             "(ray.warm_fleet=off)") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    join_head(state.address)
    print(f"warm fleet: joined {state.address} (dashboard {state.dashboard})", flush=True)
    return WarmLease(state, lock)


def join_or_connect(cfg: TrainConfig, stack: ExitStack) -> WarmLease | None:
    """This process on a cluster for the job of `cfg`: the warm fleet (`join`), held until
    `stack` closes, if one is up for it; else None, Ray joined or a local cluster started
    (`fleet.connect_ray`; one started here shut down when `stack` closes)."""
    import ray

    lease = join(cfg)
    if lease is not None:
        stack.callback(lease.release)
    elif connect_ray(cfg):
        stack.callback(ray.shutdown)
    return lease


def join_head(address: str, **init_kwargs) -> None:
    """This process on the warm fleet's head, with its token (Ray reads its auth mode when
    its config is first loaded, at import: loaded again) and on loopback (else Ray swaps
    127.0.0.1 for the machine's address, where nothing listens)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.update(AUTH_ENV)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    loopback_only()
    ray.init(address=address, _node_ip_address="127.0.0.1", logging_level="WARNING",
             **init_kwargs)


def short_temp_dir() -> Path:
    """Ray's session directory: short, as the Unix sockets in it must be (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="lf-warm-", dir="/tmp"))


def stop(directory: Path | None = None) -> WarmState | None:
    """The warm fleet stopped (its head's processes killed, its files removed); None if none
    was up."""
    directory = directory or warm_dir()
    state = WarmState.read(directory)
    if state is None:
        return None
    stop_head(state.pid)
    deadline = time.time() + 30
    while state.alive() and time.time() < deadline:
        time.sleep(0.2)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    (directory / STATE).unlink(missing_ok=True)
    return state


def job_specs(cfg: TrainConfig, adapters: int
              ) -> tuple[LearnerSpec, EngineSpec, EngineSpec | None]:
    """The learner's, the rollout engines' and the learner's own engine's (colocated, else
    None) specs of the fleet a training job of `cfg` starts, each engine with room for
    `adapters` adapters at once (a sweep's policies)."""
    from .policy_state import load_policies

    learner, engine = run_specs(cfg, load_policies(cfg))
    engine = replace(engine, max_loras=max(engine.max_loras, adapters))
    return learner, engine, learner_engine(cfg, engine)


def start(cfg: TrainConfig, learner: LearnerSpec, engine: EngineSpec,
          own_engine: EngineSpec | None, command: str) -> WarmState:
    """`lorafleet up`: a Ray head of its own on 127.0.0.1, and the learner and rollout
    engines of `cfg`'s groups built from these specs (`job_specs`, or a server's), detached
    (they outlive this process). Returns once all are up."""
    import ray

    directory = warm_dir()
    directory.mkdir(parents=True, exist_ok=True)
    state = WarmState.read(directory)
    if state is not None and state.alive():
        raise WarmFleetError(f"a warm fleet is up already at {state.address} (`{state.command}`"
                             "): `lorafleet down` first")
    temp = short_temp_dir()
    env = {**os.environ, **RUNTIME_ENV["env_vars"], **library_env(), LOOPBACK_ONLY: "0"}
    process, head = start_head(temp, cfg.ray.num_cpus or os.cpu_count(), env, directory / LOG)
    try:
        join_head(head.address, namespace=NAMESPACE)
        learner_group, rollout_group, _ = group_specs(cfg)
        placement = place([learner_group, rollout_group], cfg.placement.strategy,
                          cfg.placement.timeout_s, lifetime="detached")
        learners, rollout = start_engines_and_learner(
            [learner_group, rollout_group], placement, learner, engine, own_engine, "detached")
        ray.get(learners.ready() + rollout.ready())
        state = WarmState(
            head.address, head.dashboard, process.pid, str(temp), placement.group.id.hex(),
            placement.first_bundle,
            {group.spec.role: [group.spec.name.format(i=group.shared + i)
                               for i in range(len(group.own))] for group in (learners, rollout)},
            {spec.role: group_shape(spec) for spec in (learner_group, rollout_group)},
            spec_dict(engine), spec_dict(own_engine) if own_engine else None, spec_dict(learner),
            command)
        state.write(directory)
    except BaseException:
        stop_head(process.pid)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        ray.shutdown()
    return state
