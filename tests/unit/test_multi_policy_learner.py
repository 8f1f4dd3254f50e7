"""Several policies on one learner (one base model): each trains on its own adapters with its
own optimiser, version and RL updater, exactly as it would alone; another policy's rollouts
and a diverged update never reach its weights."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from helpers import contrast_batch, new_learner
from lorafleet.common.records import ProbeResult, UpdateDiverged
from lorafleet.common.specs import LearnerSpec, PolicySpec
from lorafleet.learner.actor import train_one
from lorafleet.learner.algorithms.registry import algorithm
from lorafleet.learner.core import SyncError
from lorafleet.learner.model import VALUE, collate, value_adapter

A, B = "policy_lr=1e-4", "seed=1"  # names as a sweep writes them
PPO = algorithm("ppo").config(minibatch_size=16)


def two_policies(model_path, tokenizer):
    return new_learner(model_path, tokenizer.pad_token_id, policies=(
        PolicySpec(A, PPO, seed=0), PolicySpec(B, PPO, seed=1)))


def weights(learner, name: str) -> dict[str, torch.Tensor]:
    """A policy's adapter and value adapter tensors (+ value head), copied."""
    net, adapter = learner.net, learner.get_policy(name).core.adapter
    out = {f"{n}": p.detach().clone() for n, p in net.model.named_parameters()
           if f".{adapter}." in n or f".{value_adapter(adapter)}." in n}
    out |= {f"head.{k}": v.clone()
            for k, v in net.heads[value_adapter(adapter)].state_dict().items()}
    return out


def optimiser_state(learner, name: str) -> list[torch.Tensor]:
    policy = learner.get_policy(name)
    states = [policy.core.policy_opt.state, policy.rl.value.opt.state]
    return [t.clone() for state in states for s in state.values() for t in s.values()]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batch(tokenizer, learner, name: str, **keys):
    return contrast_batch(tokenizer, learner.get_version(name), policy=name, **keys)


def test_each_policy_trains_as_it_would_alone(tiny_model_path, tokenizer):
    learner = two_policies(tiny_model_path, tokenizer)
    assert learner.policy_names() == [A, B]
    # adapters named by the learner: the first policy's as a one-policy run's
    assert learner.net.heads.keys() == {VALUE, value_adapter("policy1")}
    assert value_adapter("policy") == VALUE
    # each policy's adapters are drawn as a one-policy learner's of its seed...
    alone = [new_learner(tiny_model_path, tokenizer.pad_token_id, PPO, seed=seed)
             for seed in (0, 1)]
    for name, single in zip((A, B), alone, strict=True):
        ours, theirs = learner.publish(name), single.publish()
        assert same(ours.tensors, theirs.tensors) and ours.version == 0
        adapter = learner.get_policy(name).core.adapter
        assert torch.equal(learner.net.heads[value_adapter(adapter)].weight,
                           single.net.value_head.weight)
    # ...and trains as it: same stats, same weights; the other policy untouched
    b_weights, b_state = weights(learner, B), optimiser_state(learner, B)
    for _ in range(2):
        ours = train_one(learner, batch(tokenizer, learner, A), A)
        theirs = train_one(alone[0], contrast_batch(tokenizer, alone[0].version))
        assert (ours.policy_loss, ours.value_loss) == (theirs.policy_loss, theirs.value_loss)
    assert same(learner.publish(A).tensors, alone[0].publish().tensors)
    assert same(weights(learner, B), b_weights) and b_state == optimiser_state(learner, B) == []
    assert (learner.get_version(A), learner.get_version(B)) == (2, 0)

    a_weights, a_state = weights(learner, A), optimiser_state(learner, A)
    stats = train_one(learner, batch(tokenizer, learner, B), B)
    assert stats.adapter_version == 0
    assert (learner.get_version(A), learner.get_version(B)) == (2, 1)
    assert same(weights(learner, A), a_weights)
    assert all(torch.equal(x, y) for x, y in zip(a_state, optimiser_state(learner, A),
                                                 strict=True))
    assert not same(weights(learner, B), b_weights)


def probe_of(learner, name: str, tokenizer, version: int) -> ProbeResult:
    """What a worker serving policy `name`'s adapter at `version` reports: its log-probs."""
    prompts = [tokenizer(t).input_ids for t in ("12+7=", "3+45=")]
    responses = [tokenizer(t, add_special_tokens=False).input_ids for t in ("19", "48")]
    with torch.no_grad():
        logp = learner.get_policy(name).core.logprobs(
            collate(prompts, responses, tokenizer.pad_token_id))
    return ProbeResult(0, version, prompts, responses,
                       [row[: len(r)].tolist() for row, r in zip(logp, responses, strict=True)])


def test_publish_and_probe_check_per_policy(tiny_model_path, tokenizer):
    learner = two_policies(tiny_model_path, tokenizer)
    train_one(learner, batch(tokenizer, learner, A), A)
    a, b = learner.publish(A), learner.publish(B)
    assert (a.version, b.version) == (1, 0) and not same(a.tensors, b.tensors)

    served_a, served_b = probe_of(learner, A, tokenizer, 1), probe_of(learner, B, tokenizer, 0)
    assert learner.check_probe([served_a], 1e-5, A) < 1e-5
    assert learner.check_probe([served_b], 1e-5, B) < 1e-5
    with pytest.raises(SyncError, match="reports adapter v1 of policy 'seed=1', learner "
                                        "published v0"):
        learner.check_probe([served_a], 1e-5, B)
    # policy a's adapter where b's should be, labelled as b's version: caught by the log-probs
    with pytest.raises(SyncError, match="claims adapter v0 of policy 'seed=1' but its probe"):
        learner.check_probe([replace(served_a, adapter_version=0)], 1e-5, B)


def test_checkpoint_per_policy_round_trips(tiny_model_path, tokenizer, tmp_path):
    learner = two_policies(tiny_model_path, tokenizer)
    for name, steps in ((A, 2), (B, 1)):
        for _ in range(steps):
            train_one(learner, batch(tokenizer, learner, name), name)
        learner.save_checkpoint(str(tmp_path / name), name)
    # each policy's directory reads as a one-policy run's
    assert (tmp_path / B / "adapter_config.json").exists()
    assert (tmp_path / B / VALUE / "value_head.safetensors").exists()
    learner.save(str(tmp_path / "adapter"), B)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", VALUE]

    restored = two_policies(tiny_model_path, tokenizer)
    assert restored.load_checkpoint(str(tmp_path / B), B) == 1
    assert restored.load_checkpoint(str(tmp_path / A), A) == 2
    for name in (A, B):
        assert same(weights(restored, name), weights(learner, name))
        # the same next update: Adam moments and the minibatch shuffle came back
        ours = train_one(learner, batch(tokenizer, learner, name), name)
        theirs = train_one(restored, batch(tokenizer, restored, name), name)
        assert (ours.policy_loss, ours.value_loss) == (theirs.policy_loss, theirs.value_loss)
        assert same(weights(restored, name), weights(learner, name))


def test_a_diverged_update_is_refused_and_the_other_policy_trains_on(tiny_model_path,
                                                                     tokenizer):
    learner = two_policies(tiny_model_path, tokenizer)
    nan_batch = [replace(s, reward=math.nan) for s in batch(tokenizer, learner, A)]
    a_weights = weights(learner, A)
    with pytest.raises(UpdateDiverged, match=r"^policy 'policy_lr=1e-4': the update at "
                       r"version 0 diverged \((loss|grad norm) nan\); not applied$"):
        train_one(learner, nan_batch, A)
    assert same(weights(learner, A), a_weights) and optimiser_state(learner, A) == []
    assert learner.get_version(A) == 0
    train_one(learner, batch(tokenizer, learner, B), B)
    assert learner.get_version(B) == 1


def test_a_policy_refuses_other_policies_rollouts_and_unknown_names(tiny_model_path,
                                                                    tokenizer):
    learner = two_policies(tiny_model_path, tokenizer)
    with pytest.raises(SyncError, match=r"64 rollouts were sampled by policy 'seed=1' \(prompt "
                                        r"0 sample 0 on worker 0\), not by 'policy_lr=1e-4'"):
        train_one(learner, batch(tokenizer, learner, B), A)
    assert (learner.get_version(A), learner.get_version(B)) == (0, 0)
    with pytest.raises(ValueError,
                       match="no policy 'policy'; it trains 'policy_lr=1e-4', 'seed=1'"):
        learner.get_version()
    with pytest.raises(ValueError, match="distinct names"):
        LearnerSpec(tiny_model_path, 0, (PolicySpec(A, PPO), PolicySpec(A, PPO)))



def test_policy_names_are_the_users(tiny_model_path, tokenizer):
    """The learner names the adapters: a policy may be called after a layer (`0`), PEFT's own
    names (`a` of `lora_A`), the learner's (`value`, `policy`) or PEFT's default."""
    names = ("0", "a", "value", "policy", "default")
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, policies=tuple(
        PolicySpec(name, PPO, seed=i) for i, name in enumerate(names)))
    adapters = [learner.get_policy(name).core.adapter for name in names]
    assert adapters == ["policy", "policy1", "policy2", "policy3", "policy4"]
    results = learner.train_step({name: batch(tokenizer, learner, name) for name in names})
    assert all(r.adapter_version == 0 for r in results.values())
    snapshots = [learner.publish(name) for name in names]
    assert all(not same(snapshots[0].tensors, s.tensors) for s in snapshots[1:])
