"""The run's actor groups from a config: their sizes, shares, names and restart policy, and
only the learner when no stage generates."""

from __future__ import annotations

import pytest

from lorafleet.cluster.actor_group import Resources
from lorafleet.cluster.colocated import ColocatedLearner
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.specs import colocated, group_specs, placement_label, rollout_workers
from lorafleet.common.configio import ConfigError


def test_the_default_job_has_a_learner_two_rollout_workers_and_two_reward_actors():
    learner, rollout, reward = group_specs(load_train_config(None, ["placement.colocate=off"]))
    assert [(g.role, g.size) for g in (learner, rollout, reward)] == [
        ("learner", 1), ("rollout", 2), ("reward", 2)
    ]
    assert learner.actor_class.__name__ == "Learner"
    assert learner.name == "lorafleet-learner" and learner.max_restarts == 0
    assert rollout.name.format(i=1) == "lorafleet-rollout-1" and rollout.max_restarts == 3
    assert rollout.index_kwarg == "worker_id" and reward.max_restarts == 3
    # a stuck rollout worker is killed and recovered after rollout.call_timeout_s; the learner
    # is waited for without limit, the reward pool has its own (reward.timeout_s)
    assert rollout.call_timeout == ("rollout.call_timeout_s", 1800.0)
    assert learner.call_timeout is None and reward.call_timeout is None
    assert learner.resources == Resources(cpus=0.8) and learner.resources.bundle() == {"CPU": 0.8}
    assert learner.resource_keys == {"CPU": "learner.cpus", "GPU": "learner.num_gpus"}


def test_a_reward_model_stage_alone_starts_only_the_learner():
    groups = group_specs(load_train_config(None, ["stages=[rm]", "reward.rule_weight=0"]))
    assert [g.size for g in groups] == [1, 0, 0]
    groups = group_specs(load_train_config(None, ["stages=[rm, sft]", "placement.colocate=off"]))
    assert [g.size for g in groups] == [1, 2, 2]


def test_colocated_the_learner_holds_worker_0_in_one_bundle(monkeypatch):
    """placement.colocate=auto colocates on a local cluster without GPUs, and only there;
    rollout.num_workers counts the colocated engine (by default the only one)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_train_config(None)
    assert rollout_workers(cfg) == 1 and placement_label(cfg) == (
        "learner + engine colocated in one actor (placement.colocate=auto)")
    assert [g.size for g in group_specs(cfg)] == [1, 0, 2]
    for colocate in ("auto", "on"):
        learner, rollout, reward = group_specs(load_train_config(
            None, [f"placement.colocate={colocate}", "rollout.num_workers=2"]))
        assert learner.actor_class is ColocatedLearner
        assert [g.size for g in (learner, rollout, reward)] == [1, 1, 2]  # worker 0 is in it
        assert learner.resources == Resources(cpus=1.3)  # learner.cpus + rollout.cpus_per_worker
        assert learner.resource_keys["CPU"] == "learner.cpus + rollout.cpus_per_worker"
    # auto keeps them apart on a cluster joined (GPU nodes, an autoscaler) and with GPUs, with
    # two engines by default
    assert not colocated(load_train_config(None, ["learner.num_gpus=1"]))
    assert not colocated(load_train_config(None, ["ray.address=auto"]))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not colocated(load_train_config(None))
    assert colocated(load_train_config(None, ["placement.colocate=on"]))
    assert placement_label(load_train_config(None)) == (
        "learner + 2 rollout worker(s), each its own actor (placement.colocate=auto)")


def test_colocate_on_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match=r"stages \['rm'\] generate nothing"):
        colocated(load_train_config(None, ["placement.colocate=on", "stages=[rm]",
                                           "reward.rule_weight=0"]))
    with pytest.raises(ConfigError, match="give the learner the GPU"):
        colocated(load_train_config(None, ["placement.colocate=on",
                                           "rollout.num_gpus_per_worker=1"]))
