"""Groups of like actors: the learner (a group of one), the rollout workers, the reward actors.
A group's spec says what each actor reserves and how Ray restarts it; the run's one placement
group is made of every group's bundles (fractional CPUs: the default job fits on 2 cores); a
group fans calls out to its actors and brings a restarted actor back before re-sending."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

PLACEMENT_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 600  # a restarted rollout worker reloads its model and engine


@dataclass(frozen=True)
class Resources:
    """What one actor reserves: its bundle in the placement group."""

    cpus: float

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus}

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.cpus}


@dataclass(frozen=True)
class GroupSpec:
    """`size` actors of `actor_class`, each reserving `resources`."""

    role: str  # "learner", "rollout", "reward": in messages and the restart metric's tag
    actor_class: type
    size: int
    resources: Resources
    resources_key: str  # the config key that sets `resources`, named when placement fails
    name: str  # the Ray actor name ("{i}": the actor's index)
    max_restarts: int = 0  # Ray restarts a dead actor up to this often (0: never)
    max_task_retries: int = 0  # and re-runs the call it lost (for pure calls only)
    index_kwarg: str | None = None  # the constructor keyword that gets the actor's index


@dataclass(frozen=True)
class Placement:
    group: object  # ray.util.placement_group.PlacementGroup
    first_bundle: dict[str, int]  # role -> the index of its first actor's bundle

    def strategy(self, role: str, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.first_bundle[role] + i
        )

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


def place(specs: list[GroupSpec]) -> Placement:
    """One bundle per actor, the groups in order; waits until the cluster holds them all."""
    import ray
    from ray.util.placement_group import placement_group

    bundles, first_bundle = [], {}
    for spec in specs:
        first_bundle[spec.role] = len(bundles)
        bundles += [spec.resources.bundle()] * spec.size
    group = placement_group(bundles, strategy="PACK", name="lorafleet")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        demand = sum(b["CPU"] for b in bundles)
        shares = ", ".join(s.resources_key if s.size == 1 else f"{s.resources_key} x {s.size}"
                           for s in specs if s.size)
        raise RuntimeError(
            f"the actors need {demand:g} CPUs in total ({shares}) but the cluster has "
            f"{ray.available_resources().get('CPU', 0):g} free after {PLACEMENT_TIMEOUT_S} s; "
            "lower those shares or add nodes"
        ) from None
    return Placement(group, first_bundle)


def is_actor(exc: Exception, handle) -> bool:
    """Whether an actor error is about this actor (and not one it depended on)."""
    actor_id = getattr(exc, "actor_id", None)
    return actor_id is not None and actor_id == handle._actor_id.hex()


class ActorGroup:
    """The running actors of one spec. `call` fans a method out and survives an actor's
    death: Ray restarts it (spec.max_restarts), `revive(i)` brings it back in step (e.g. the
    current adapter, verified), and its call is sent again."""

    def __init__(self, spec: GroupSpec, actors: list) -> None:
        self.spec = spec
        self.actors = actors
        self.restarts = 0
        self.revive: Callable[[int], None] | None = None
        self.on_restart: Callable[[str], None] | None = None  # callback(role), e.g. a metric

    @classmethod
    def start(cls, spec: GroupSpec, placement: Placement, *args, **kwargs) -> ActorGroup:
        """Starts the actors in their bundles (without waiting: see `ready`)."""
        import ray

        remote = ray.remote(spec.actor_class)
        actors = []
        for i in range(spec.size):
            index = {spec.index_kwarg: i} if spec.index_kwarg else {}
            actors.append(remote.options(
                **spec.resources.actor_options(), scheduling_strategy=placement.strategy(
                    spec.role, i), name=spec.name.format(i=i), max_restarts=spec.max_restarts,
                max_task_retries=spec.max_task_retries,
            ).remote(*args, **kwargs, **index))
        return cls(spec, actors)

    def ready(self) -> list:
        """ObjectRefs that resolve once every actor is constructed (or raise its error)."""
        return [actor.__ray_ready__.remote() for actor in self.actors]

    def call(self, method: Callable, items: dict[int, object] | None = None) -> list:
        """`method(actor, item)` -> ObjectRef for each actor index in `items` (every actor,
        with item None, by default); results in the order of `items`."""
        import ray

        items = items if items is not None else dict.fromkeys(range(len(self.actors)))
        refs = {i: method(self.actors[i], item) for i, item in items.items()}
        results = []
        for i, ref in refs.items():
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as exc:
                    if not is_actor(exc, self.actors[i]):  # e.g. the learner behind an arg
                        raise
                    self.recover(i, exc)
                    ref = method(self.actors[i], items[i])
        return results

    def recover(self, i: int, exc: Exception) -> None:
        import ray

        actor, what = self.actors[i], f"{self.spec.role} actor {i}"
        print(f"{what} died ({str(exc).splitlines()[0][:200]}); waiting for Ray to restart it",
              flush=True)
        start = time.perf_counter()
        while True:
            try:
                ray.get(actor.__ray_ready__.remote())
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: calls fail fast
                if time.perf_counter() - start > RESTART_TIMEOUT_S:
                    raise RuntimeError(
                        f"{what} did not come back within {RESTART_TIMEOUT_S} s"
                    ) from exc
                time.sleep(1.0)
            except ray.exceptions.RayActorError:
                raise RuntimeError(
                    f"{what} died and was not restarted (ray.max_actor_restarts="
                    f"{self.spec.max_restarts} used up, or its node is gone)"
                ) from exc
        if self.revive is not None:
            self.revive(i)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.spec.role)
        print(f"{what} is back ({time.perf_counter() - start:.1f} s)", flush=True)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
