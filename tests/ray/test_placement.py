"""Placement on a local cluster with 2 logical GPUs: the bundles built from the config's
resource keys, which actor got which GPU ids (and CUDA_VISIBLE_DEVICES), two rollout workers
sharing one GPU at 0.5 each, and the fail-fast errors naming the keys. Probe actors stand in
for the real ones (same specs, same placement and start path); no CUDA, torch or vLLM runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorafleet.cluster.actor_group import ActorGroup, PlacementError, place
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.specs import group_specs

# fits 2 CPUs and 2 GPUs: a whole GPU for the learner, one GPU shared by two rollout workers
GPU_RUN = ["learner.num_gpus=1", "learner.cpus=0.5", "rollout.num_gpus_per_worker=0.5",
           "rollout.cpus_per_worker=0.25", "reward.num_actors=1", "reward.cpus_per_actor=0.1"]


def probe_class() -> type:
    """Defined in a function so Ray ships it by value (this module is not on workers' path)."""

    class Probe:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def assigned(self) -> tuple[list[str], str | None]:
            import os

            import ray

            return [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    return Probe


def probes(overrides: list[str]):
    probe = probe_class()
    return [replace(s, actor_class=probe) for s in group_specs(load_train_config(None, overrides))]


def test_gpus_are_placed_by_role_and_shared_by_fraction(ray_cluster):
    specs = probes(GPU_RUN)
    placement = place(specs, "PACK", timeout_s=30)
    groups = [ActorGroup.start(spec, placement) for spec in specs]
    try:
        assert placement.group.bundle_specs == [
            {"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.25, "GPU": 0.5}, {"CPU": 0.25, "GPU": 0.5},
            {"CPU": 0.1},
        ]
        learner, rollout, reward = (g.call("assigned") for g in groups)
        [(learner_ids, learner_env)] = learner
        assert len(learner_ids) == 1 and learner_env == learner_ids[0]
        # both workers on the same one GPU, not the learner's
        assert rollout[0] == rollout[1] and len(rollout[0][0]) == 1
        assert rollout[0][0] != learner_ids and rollout[0][1] == rollout[0][0][0]
        assert reward[0][0] == []  # no GPU asked, none given
    finally:
        for group in groups:
            group.kill()
        placement.remove()


def test_a_run_asking_for_more_than_the_cluster_has_fails_at_once_naming_the_keys(ray_cluster):
    import ray

    specs = probes(GPU_RUN + ["rollout.num_gpus_per_worker=1", "learner.resources={a100: 1}"])
    groups_before = set(ray.util.placement_group_table())
    with pytest.raises(PlacementError) as error:
        place(specs, "PACK", timeout_s=30)
    message = str(error.value)
    assert "3 GPU asked in total (learner.num_gpus=1, rollout.num_gpus_per_worker=1 x 2 " \
           "actors) but the cluster has 2" in message
    assert "1 a100 asked in total (learner.resources.a100=1) but the cluster has 0" in message
    # the up-front check failed it: no placement group was made to wait on
    assert set(ray.util.placement_group_table()) == groups_before


def test_a_cluster_that_could_grow_fails_after_placement_timeout(ray_cluster):
    """Joined clusters may autoscale: no failing up front, but no endless wait either."""
    import ray

    specs = probes(GPU_RUN + ["rollout.num_gpus_per_worker=1"])
    groups_before = set(ray.util.placement_group_table())
    with pytest.raises(PlacementError, match=r"placement.timeout_s=1 s \(3 GPU asked"):
        place(specs, "PACK", timeout_s=1, fixed_cluster=False)
    table = ray.util.placement_group_table()
    # the group was made and waited on (no up-front failure), then removed at the timeout
    [made] = set(table) - groups_before
    assert table[made]["state"] == "REMOVED"
    pending = [g for g in table.values() if g["state"] != "REMOVED"]
    assert pending == []  # the unplaceable group is not left behind


def test_an_actor_that_dies_while_it_is_revived_is_waited_for_again(ray_cluster):
    """The first revive kills the actor it revives (as a second fault would): the group waits
    for the next restart, revives that one, and the call is answered."""
    import os
    import signal

    import ray

    specs = probes(["reward.num_actors=1"])
    reward = specs[2]
    placement = place([reward], "PACK", timeout_s=30)
    group = ActorGroup.start(reward, placement)
    revived: list[int] = []

    def revive(i: int) -> None:
        pid = ray.get(group.actors[i].__ray_call__.remote(lambda _: os.getpid()))
        revived.append(pid)
        if len(revived) == 1:
            os.kill(pid, signal.SIGKILL)
            ray.get(group.actors[i].assigned.remote())  # fails: the actor is gone again

    group.revive = revive
    try:
        os.kill(ray.get(group.actors[0].__ray_call__.remote(lambda _: os.getpid())),
                signal.SIGKILL)
        assert group.call("assigned") == [([], None)]
        assert len(revived) == 2 and revived[0] != revived[1] and group.restarts == 1
    finally:
        group.kill()
        placement.remove()
