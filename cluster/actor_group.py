"""Groups of like actors: the learner (a group of one), the rollout workers, the reward actors.
A group's spec says what each actor reserves and how Ray restarts it; the run's one placement
group is made of every group's bundles (fractional CPUs: the default job fits on 2 cores); a
group fans calls out to its actors and brings a restarted actor back before re-sending; an
actor whose node was lost waits for its bundle to be placed again, at most placement.timeout_s."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RESTART_TIMEOUT_S = 600  # a restarted rollout worker reloads its model and engine
POLL_S = 1.0  # how often a recovery looks at its actor and its bundle


class PlacementError(RuntimeError):
    """The cluster cannot hold the actors' bundles: names the resource and the config keys."""


@dataclass(frozen=True)
class Resources:
    """What one actor reserves: its bundle in the placement group. Ray gives an actor with
    GPUs their ids (`ray.get_gpu_ids()`) and sets its CUDA_VISIBLE_DEVICES to them."""

    cpus: float
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)  # e.g. a node type's {"a100": 1}

    def bundle(self) -> dict[str, float]:
        """Ray's resource names; zero asks left out (Ray refuses them in a bundle)."""
        asks = {"CPU": self.cpus, "GPU": self.gpus, **self.custom}
        return {name: amount for name, amount in asks.items() if amount}

    def actor_options(self) -> dict:
        options: dict = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


@dataclass(frozen=True)
class GroupSpec:
    """`size` actors of `actor_class`, each reserving `resources`."""

    role: str  # "learner", "rollout", "reward": in messages and the restart metric's tag
    actor_class: type
    size: int
    resources: Resources
    # Ray resource name ("CPU", "GPU", custom) -> the config key that asks for it, named when
    # the cluster cannot hold the group
    resource_keys: dict[str, str]
    name: str  # the Ray actor name ("{i}": the actor's index)
    max_restarts: int = 0  # Ray restarts a dead actor up to this often (0: never)
    index_kwarg: str | None = None  # the constructor keyword that gets the actor's index
    # errors by which an actor says it lost its state: it restarted without the group seeing
    # its death (the calls that met the dead process were already done); recovered as a death
    lost_state: tuple[type[Exception], ...] = ()
    # (config key, seconds): a call not answered this long after `collect` began waiting for
    # it gets its actor killed for Ray to restart, then recovered as a death; None: calls are
    # waited for without limit (the learner's are long, and its death ends the run)
    call_timeout: tuple[str, float] | None = None


@dataclass(frozen=True)
class Placement:
    group: object  # ray.util.placement_group.PlacementGroup
    first_bundle: dict[str, int]  # role -> the index of its first actor's bundle
    # how long a bundle may go without a node (at the start, or after its node was lost)
    timeout_s: float

    def strategy(self, role: str, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.first_bundle[role] + i
        )

    def has_node(self, role: str, i: int) -> bool:
        """Whether actor i of `role` has its bundle on a node: after its node is lost, Ray
        places the bundle again once some node has the resources free."""
        from ray.util.placement_group import placement_group_table

        nodes = placement_group_table(self.group)["bundles_to_node_id"]
        return bool(nodes.get(self.first_bundle[role] + i))

    def remove(self) -> None:
        remove_group(self.group)


def shortfalls(specs: list[GroupSpec], nodes: list[dict[str, float]], strategy: str) -> list[str]:
    """What `nodes` (each node's total resources) cannot hold of the groups' bundles: a
    resource short in the cluster's total, a bundle no node can hold, or (STRICT_PACK) the
    whole group on one node. Each names the config keys that ask for it."""
    asks: dict[str, list[str]] = {}  # resource -> "key=amount[ x size]" of each group
    demand: dict[str, float] = {}
    problems = []
    for spec in specs:
        if not spec.size:
            continue
        bundle = spec.resources.bundle()
        for name, amount in bundle.items():
            demand[name] = demand.get(name, 0.0) + amount * spec.size
            times = f" x {spec.size} actors" if spec.size > 1 else ""
            asks.setdefault(name, []).append(f"{spec.resource_keys[name]}={amount:g}{times}")
        if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
            largest = {k: max((node.get(k, 0) for node in nodes), default=0) for k in bundle}
            problems.append(
                f"no node can hold one {spec.role} actor's bundle {bundle} (the largest node "
                f"offers {largest}; keys: {', '.join(spec.resource_keys[k] for k in bundle)})")
    totals = {name: sum(node.get(name, 0) for node in nodes) for name in demand}
    problems = [f"{amount:g} {name} asked in total ({', '.join(asks[name])}) but the cluster "
                f"has {totals[name]:g}" for name, amount in demand.items()
                if amount > totals[name] + 1e-9] + problems
    if strategy == "STRICT_PACK" and not problems and not any(
            all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
        problems.append(f"placement.strategy=STRICT_PACK puts every actor on one node, and no "
                        f"node holds {demand}")
    return problems


def place(specs: list[GroupSpec], strategy: str = "PACK", timeout_s: float = 60.0,
          fixed_cluster: bool = True, lifetime: str | None = None) -> Placement:
    """One bundle per actor, the groups in order; waits until the cluster holds them all.
    A fixed cluster (one we started; no autoscaler to add nodes) that cannot hold them fails
    at once; any cluster fails after `timeout_s` rather than Ray's endless wait. `lifetime`
    "detached": the group outlives the driver (a warm fleet's)."""
    import ray
    from ray.util.placement_group import placement_group

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    missing = shortfalls(specs, nodes, strategy)
    if missing and fixed_cluster:
        raise PlacementError("the cluster cannot hold the run's actors: " + "; ".join(missing)
                             + ". Lower those asks or use a larger cluster")
    bundles, first_bundle = [], {}
    for spec in specs:
        first_bundle[spec.role] = len(bundles)
        bundles += [spec.resources.bundle()] * spec.size
    group = placement_group(bundles, strategy=strategy, name="lorafleet", lifetime=lifetime)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_group(group)
        why = "; ".join(missing) if missing else (
            f"the cluster has them, but not free: {ray.available_resources()} available")
        raise PlacementError(
            f"the actors' resources were not placed within placement.timeout_s={timeout_s:g} s "
            f"({why}). Lower those asks, add nodes, or, while an autoscaler adds them, raise "
            "placement.timeout_s") from None
    return Placement(group, first_bundle, timeout_s)


def remove_group(group) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


def is_actor(exc: Exception, handle) -> bool:
    """Whether an actor error is about this actor (and not one it depended on)."""
    actor_id = getattr(exc, "actor_id", None)
    return actor_id is not None and actor_id == handle._actor_id.hex()


@dataclass
class Calls:
    """Calls of one actor method under way on some of a group's actors: `refs` by actor
    index, each sent with `args(item)` of its item."""

    method: str
    args: Callable[[object], tuple]
    items: dict[int, object]
    refs: dict[int, object] = field(default_factory=dict)

    def send(self, actor, i: int) -> None:
        self.refs[i] = getattr(actor, self.method).remote(*self.args(self.items[i]))


def ray_wait(refs: list, timeout_s: float | None) -> bool:
    """Whether all `refs` are done within `timeout_s` (None: waits for them)."""
    import ray

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return len(done) == len(refs)


class ActorGroup:
    """The running actors of one spec. `call` fans a method out and survives an actor's
    death: Ray restarts it (spec.max_restarts), `revive(i)` brings it back in step (e.g. the
    current adapter, verified), and its call is sent again."""

    def __init__(self, spec: GroupSpec, actors: list, placement: Placement, shared: int = 0
                 ) -> None:
        """`shared`: the first actors belong to another group (the colocated learner, rollout
        worker 0): never restarted by this one nor timed out, their death raised as is."""
        self.spec = spec
        self.actors = actors
        self.placement = placement
        self.shared = shared
        self.restarts = 0
        self.pids: dict[int, int] = {}  # actor index -> its process after its last recovery
        self.revive: Callable[[int], None] | None = None
        # a warm fleet's actors, lent to this job: left running when it ends (cluster/warm.py)
        self.lent = False
        self.on_restart: Callable[[str], None] | None = None  # callback(role), e.g. a metric

    @classmethod
    def start(cls, spec: GroupSpec, placement: Placement, *args, shared: tuple = (),
              lifetime: str | None = None, **kwargs) -> ActorGroup:
        """Starts the actors in their bundles (without waiting: see `ready`), after the
        `shared` actors of another group (indices 0..len(shared)-1); `lifetime` "detached":
        they outlive the driver (a warm fleet's)."""
        import ray

        remote = ray.remote(spec.actor_class)
        actors = list(shared)
        for bundle in range(spec.size):
            i = len(shared) + bundle
            index = {spec.index_kwarg: i} if spec.index_kwarg else {}
            actors.append(remote.options(
                **spec.resources.actor_options(), scheduling_strategy=placement.strategy(
                    spec.role, bundle), name=spec.name.format(i=i),
                max_restarts=spec.max_restarts, lifetime=lifetime,
            ).remote(*args, **kwargs, **index))
        return cls(spec, actors, placement, len(shared))

    @property
    def own(self) -> list:
        """The actors this group started (not the shared ones)."""
        return self.actors[self.shared:]

    def ready(self) -> list:
        """ObjectRefs that resolve once every actor it started is constructed (or raise its
        error)."""
        return [actor.__ray_ready__.remote() for actor in self.own]

    def call(self, method: str, args: Callable[[object], tuple] = lambda _: (),
             items: dict[int, object] | None = None) -> list:
        """`actor.method.remote(*args(item))` on each actor index in `items` (every actor,
        with item None, by default); results in the order of `items`."""
        return self.collect(self.submit(method, args, items))

    def submit(self, method: str, args: Callable[[object], tuple] = lambda _: (),
               items: dict[int, object] | None = None) -> Calls:
        """`call` without waiting: the calls are under way; `collect` gets their results."""
        items = items if items is not None else dict.fromkeys(range(len(self.actors)))
        calls = Calls(method, args, items)
        for i in items:
            calls.send(self.actors[i], i)
        return calls

    def collect(self, calls: Calls, wait: Callable[[list, float | None], bool] = ray_wait
                ) -> list:
        """The results of submitted calls in the order of their items; a call whose actor died,
        or that was not answered within the spec's call timeout (the actor killed for Ray to
        restart), is sent again once the actor is back. `wait(refs, timeout_s)` says whether
        a call is done in time (the RL loop's also times the calls that finish meanwhile)."""
        import ray

        results = []
        for i in calls.items:
            # a shared actor's calls queue behind its own group's (the learner's updates)
            timeout_s = (self.spec.call_timeout[1] if self.spec.call_timeout
                         and i >= self.shared else None)
            while True:
                try:
                    if not wait([calls.refs[i]], timeout_s):
                        self.kill_stuck(i, calls.method)  # the call now fails as a death
                    results.append(ray.get(calls.refs[i]))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    # not lost: another actor's death (the learner behind an argument), or
                    # the call's own error; a shared actor's death is its own group's
                    if i < self.shared or not self.lost(exc, self.actors[i]):
                        raise
                    revived = self.recover(i, exc)
                    if not revived and isinstance(exc, ray.exceptions.RayTaskError):
                        raise  # it lost its state in the process the last recovery revived
                calls.send(self.actors[i], i)
        return results

    def kill_stuck(self, i: int, method: str) -> None:
        """Actor i did not answer `method` within the call timeout (stopped, or stuck in a
        call that never returns): killed, for Ray to restart."""
        import ray

        key, seconds = self.spec.call_timeout
        print(f"{self.spec.role} actor {i} did not answer {method} within {key}={seconds:g} s; "
              "killing it for Ray to restart", flush=True)
        ray.kill(self.actors[i], no_restart=False)

    def recover(self, i: int, exc: Exception) -> bool:
        """Waits for Ray to bring actor i back, then `revive`s it; False (nothing done) when
        it is the process the last recovery brought back. An actor whose node was lost waits
        for its bundle to be placed again, at most placement.timeout_s (else PlacementError).
        An actor that dies again while it is revived is waited for again."""
        import ray

        actor, what = self.actors[i], f"{self.spec.role} actor {i}"
        print(f"{what} died ({str(exc).splitlines()[0][:200]}); waiting for Ray to restart it",
              flush=True)
        start = time.perf_counter()
        while True:
            self.wait_back(i, what, exc)
            try:
                pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
                if self.pids.get(i) == pid:
                    # The process that came back last time: a call that was under way when
                    # the actor died can fail again on the dead process's connection
                    print(f"{what}: a call failed on the dead process; sending it again",
                          flush=True)
                    return False
                self.pids[i] = pid
                if self.revive is not None:
                    self.revive(i)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as again:
                if not self.lost(again, actor):
                    raise
                exc = again
                print(f"{what} died again while it was brought back "
                      f"({str(again).splitlines()[0][:200]}); waiting for Ray to restart it",
                      flush=True)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.spec.role)
        print(f"{what} is back ({time.perf_counter() - start:.1f} s)", flush=True)
        return True

    def lost(self, exc: Exception, actor) -> bool:
        """Whether an error says `actor` died or lost its state (and not something else)."""
        import ray

        if isinstance(exc, ray.exceptions.RayActorError):
            return is_actor(exc, actor)
        return isinstance(exc.cause, self.spec.lost_state)

    def wait_back(self, i: int, what: str, exc: Exception) -> None:
        """Until Ray has restarted actor i: a lost node's bundle is waited for at most
        placement.timeout_s, then the restart at most RESTART_TIMEOUT_S."""
        import ray

        restart = time.perf_counter()  # since its bundle last had a node
        homeless_since = None  # since its bundle was first seen without a node
        ready = self.actors[i].__ray_ready__.remote()
        while not self.is_ready(ready, what, exc):
            now = time.perf_counter()
            if self.placement.has_node(self.spec.role, i - self.shared):
                homeless_since = None
            elif homeless_since is None:
                homeless_since = now
                print(f"{what}: {self.homeless(i)}; waiting up to placement.timeout_s="
                      f"{self.placement.timeout_s:g} s for a node to hold it", flush=True)
            elif now - homeless_since > self.placement.timeout_s:
                raise PlacementError(
                    f"{what}: {self.homeless(i)}, and none did within placement.timeout_s="
                    f"{self.placement.timeout_s:g} s. Add a node that holds the bundle, or "
                    "raise placement.timeout_s while an autoscaler adds one") from exc
            restart = now if homeless_since is not None else restart
            if now - restart > RESTART_TIMEOUT_S:
                raise RuntimeError(f"{what} did not come back within {RESTART_TIMEOUT_S} s "
                                   "of its bundle's placement") from exc
            if ray.wait([ready], timeout=0)[0]:  # failed fast: restarting
                ready = self.actors[i].__ray_ready__.remote()

    def is_ready(self, ready, what: str, exc: Exception) -> bool:
        """Whether the actor answered `ready` (a __ray_ready__ call) within POLL_S; False
        while Ray restarts it (the call failed fast, or waits for the actor's bundle)."""
        import ray

        if not ray.wait([ready], timeout=POLL_S)[0]:
            return False
        try:
            ray.get(ready)
            return True
        except ray.exceptions.ActorUnavailableError:  # restarting: calls fail fast
            time.sleep(POLL_S)
            return False
        except ray.exceptions.RayActorError:
            raise RuntimeError(f"{what} died and was not restarted (ray.max_actor_restarts="
                               f"{self.spec.max_restarts} used up)") from exc

    def homeless(self, i: int) -> str:
        """What actor i's bundle asks for (and its keys) that no node holds now."""
        import ray

        bundle = self.spec.resources.bundle()
        free = ray.available_resources()
        keys = ", ".join(self.spec.resource_keys[name] for name in bundle)
        return (f"its bundle {bundle} (keys: {keys}) has no node since its node was lost "
                f"(free in the cluster: { {name: free.get(name, 0.0) for name in bundle} })")

    def kill(self) -> None:
        """The actors it started stopped; a lent group's are left to their warm fleet."""
        import ray

        if self.lent:
            return
        for actor in self.own:
            ray.kill(actor, no_restart=True)
