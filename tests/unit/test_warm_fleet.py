"""The warm fleet's pieces without Ray: a learner attached to a new job trains exactly as one
built for it (its base model kept, the job before gone), and which jobs an engine built for
another may serve. The whole fleet (`lorafleet up`, two jobs, `down`) runs in the long tier,
tests/long/test_warm_fleet_jobs.py."""

from __future__ import annotations

from dataclasses import replace

import torch

from helpers import contrast_batch, new_learner
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.specs import group_specs
from lorafleet.cluster.warm import WarmState, group_shape, shape_problems, spec_dict
from lorafleet.common.specs import EngineSpec, LearnerSpec, PolicySpec
from lorafleet.learner.actor import train_one
from lorafleet.rollout.worker import engine_fits


def test_an_attached_learner_trains_as_a_new_one(tiny_model_path, tokenizer):
    pad = tokenizer.pad_token_id
    fresh = new_learner(tiny_model_path, pad, seed=3)
    warm = new_learner(tiny_model_path, pad, seed=0)
    base = warm.net.model.get_base_model()
    train_one(warm, contrast_batch(tokenizer, 0))  # the job before: its steps must not stay
    warm.attach(fresh.spec)
    assert warm.net.model.get_base_model() is base  # the base kept, not loaded again
    assert sorted(warm.policies) == sorted(fresh.policies)
    for a, b in zip(warm.net.model.parameters(), fresh.net.model.parameters(), strict=True):
        assert torch.equal(a, b)  # base weights untouched, the adapters drawn the same
    stats = [train_one(learner, contrast_batch(tokenizer, 0)) for learner in (warm, fresh)]
    assert (stats[0].policy_loss, stats[0].grad_norm) == (stats[1].policy_loss,
                                                          stats[1].grad_norm)
    for a, b in zip(warm.net.model.parameters(), fresh.net.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert warm.version == fresh.version == 1
    warm.detach()
    assert warm.version == 0 and warm.net.model.get_base_model() is base


def test_an_engine_serves_a_job_that_asks_at_most_what_it_has():
    built = EngineSpec("m", max_model_len=256, max_lora_rank=16, max_loras=4, seed=0)
    assert engine_fits(built, replace(built, max_lora_rank=8, max_loras=1, seed=7)) == []
    problems = engine_fits(built, replace(built, max_lora_rank=32, dtype="bfloat16"))
    assert len(problems) == 2 and "dtype" in problems[0] and "max_lora_rank" in problems[1]


def test_a_job_of_another_shape_is_named_what_differs():
    cfg = load_train_config(None, [])
    groups = group_specs(cfg)[:2]
    engine = EngineSpec("m", max_model_len=256)
    learner = LearnerSpec("m", 0, (PolicySpec(),))
    state = WarmState("a", "d", 1, "t", "pg", {}, {"learner": ["l"], "rollout": []},
                      {g.role: group_shape(g) for g in groups}, spec_dict(engine),
                      spec_dict(engine), spec_dict(learner), "lorafleet up")
    assert shape_problems(state, groups, engine, engine, learner) == []
    apart = group_specs(load_train_config(None, ["placement.colocate=off"]))[:2]
    problems = shape_problems(state, apart, engine, None, learner)
    assert any(p.startswith("learner actors") for p in problems)
    assert any(p.startswith("rollout actors") for p in problems)
    other = replace(engine, model_path="other")
    assert shape_problems(state, groups, other, other, learner) == [
        "the learner's engine: model_path: the engine has 'm', the job asks 'other'"]
