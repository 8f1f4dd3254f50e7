"""Where the actors go: one placement group, one bundle per actor, fractional CPUs so the
default job (learner + 2 rollout workers + 2 reward actors) fits on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig

PLACEMENT_TIMEOUT_S = 120


@dataclass(frozen=True)
class Placement:
    group: object  # ray.util.placement_group.PlacementGroup
    learner: int
    rollout: list[int]
    reward: list[int]

    def strategy(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle
        )


def place_actors(cfg: TrainConfig) -> Placement:
    import ray
    from ray.util.placement_group import placement_group

    bundles = [{"CPU": cfg.learner.cpus}]
    bundles += [{"CPU": cfg.rollout.cpus_per_worker}] * cfg.rollout.num_workers
    bundles += [{"CPU": cfg.reward.cpus_per_actor}] * cfg.reward.num_actors
    group = placement_group(bundles, strategy="PACK", name="lorafleet")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        demand = sum(b["CPU"] for b in bundles)
        raise RuntimeError(
            f"the actors need {demand:g} CPUs in total (learner.cpus, rollout.cpus_per_worker x "
            f"{cfg.rollout.num_workers}, reward.cpus_per_actor x {cfg.reward.num_actors}) but the "
            f"cluster has {ray.available_resources().get('CPU', 0):g} free after "
            f"{PLACEMENT_TIMEOUT_S} s; lower those shares or add nodes"
        ) from None
    n_roll = cfg.rollout.num_workers
    return Placement(
        group=group, learner=0, rollout=list(range(1, 1 + n_roll)),
        reward=list(range(1 + n_roll, 1 + n_roll + cfg.reward.num_actors)),
    )
