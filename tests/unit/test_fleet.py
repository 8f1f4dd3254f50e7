"""The run's actor groups from a config: their sizes, shares, names and restart policy, and
only the learner when no stage generates."""

from __future__ import annotations

from lorafleet.cluster.actor_group import Resources
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.specs import group_specs


def test_the_default_job_has_a_learner_two_rollout_workers_and_two_reward_actors():
    learner, rollout, reward = group_specs(load_train_config(None))
    assert [(g.role, g.size) for g in (learner, rollout, reward)] == [
        ("learner", 1), ("rollout", 2), ("reward", 2)
    ]
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
    groups = group_specs(load_train_config(None, ["stages=[rm, sft]"]))
    assert [g.size for g in groups] == [1, 2, 2]
