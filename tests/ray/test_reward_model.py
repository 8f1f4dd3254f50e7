"""A LoRA reward model on the real tiny model: Bradley-Terry training ranks held-out pairs,
the saved model scores identically in a reward actor (Ray) and on the learner's base."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import contrast_batch, new_learner
from lorafleet.common.config import LoRAConfig
from lorafleet.common.corpora import DatasetConfig, load_preferences
from lorafleet.common.data import epoch_batches, split_held_out
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.learner.model import REWARD, PolicyValueModel
from lorafleet.learner.reward_model import (
    RewardModelTrainer,
    rollout_rows,
    save_reward_model,
    score_rows,
)
from lorafleet.reward.model import LearnedReward
from lorafleet.reward.pool import RewardPool, RewardSpec, RewardWorker


@pytest.fixture(scope="module")
def trained(tiny_model_path, tokenizer, tmp_path_factory):
    """A reward model trained for 4 epochs on 960 task pairs, saved; its held-out results."""
    torch.manual_seed(0)
    data = load_preferences(
        DatasetConfig(task_rejected="random", max_rows=1200), AdditionTask(), tokenizer, 128
    )
    train, held_out = split_held_out(data.items, 0.2, seed=0)
    net = PolicyValueModel(tiny_model_path, LoRAConfig(), torch.float32, 0, (REWARD,))
    trainer = RewardModelTrainer(net, lr=3e-3, max_grad_norm=1.0, pad_id=tokenizer.pad_token_id)
    before = trainer.evaluate(held_out)
    for _, rows in epoch_batches(len(train), 32, 4, seed=0):
        trainer.step([train[i] for i in rows])
    after = trainer.evaluate(held_out)
    directory = save_reward_model(
        net, tmp_path_factory.mktemp("rm") / "reward_model", tiny_model_path, LoRAConfig(),
        "float32", {"eval": after},
    )
    return net, directory, before, after


def test_reward_model_ranks_held_out_pairs(trained):
    _, directory, before, after = trained
    # Measured over seeds 0-2 (split, LoRA init and batch order; 1 and 2 torch threads):
    # accuracy on the 240 held-out pairs 0.49-0.52 -> 0.71-0.77 (gain +0.20 to +0.28), mean
    # margin 1.24-1.29.
    assert after["pairs"] == 240
    assert after["accuracy"] > 0.6 and after["accuracy"] > before["accuracy"] + 0.1
    assert after["mean_margin"] > 0.6
    meta = json.loads((directory / "reward_model.json").read_text())
    assert meta["eval"] == after and meta["lora"]["rank"] == 8
    assert (directory / "adapter_config.json").exists()
    assert (directory / "reward_head.safetensors").exists()


def test_saved_reward_model_scores_identically(trained, tokenizer):
    net, directory, _, _ = trained
    # gold answers vs sums off by 37: the kind of wrong answer the model was trained against
    # (random wrong sums; it cannot tell the habit's sum + 1 from the gold one: README, PERL)
    rollouts = [s.rollout for s in contrast_batch(tokenizer, 0, offset=37)]
    expected = score_rows(net, rollout_rows(tokenizer, rollouts), tokenizer.pad_token_id)
    assert LearnedReward(str(directory)).score(rollouts) == expected
    # the gold answers (even rows) outscore the wrong ones on most prompts (measured 27-29 of
    # 32 over seeds 0-2; against the sum + 1: 15-16, a coin flip)
    wins = sum(c > r for c, r in zip(expected[0::2], expected[1::2], strict=True))
    assert wins > 16, f"{wins}/32"


def test_reward_actors_combine_rule_and_model(trained, tokenizer, ray_cluster):
    net, directory, _, _ = trained
    rollouts = [s.rollout for s in contrast_batch(tokenizer, 0)]
    expected = score_rows(net, rollout_rows(tokenizer, rollouts), tokenizer.pad_token_id)
    spec = RewardSpec(("exact_match",), rule_weight=0.5, model=str(directory), model_weight=2.0)
    actors = [ray_cluster.remote(RewardWorker).options(num_cpus=0.1).remote(spec)
              for _ in range(2)]
    try:
        scored = RewardPool(actors, batch_size=16, timeout_s=60).score(rollouts)
    finally:
        for actor in actors:
            ray_cluster.kill(actor)
    assert [s.model_reward for s in scored] == expected
    assert [s.rule_reward for s in scored] == [1.0, 0.0] * 32
    assert [s.reward for s in scored] == [
        0.5 * rule + 2.0 * model for rule, model in zip([1.0, 0.0] * 32, expected, strict=True)
    ]


def test_reward_model_on_the_learner_base(trained, tiny_model_path, tokenizer, tmp_path):
    net, directory, _, _ = trained
    rollouts = [s.rollout for s in contrast_batch(tokenizer, 0)]
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, stages=("sft",))
    learner.load_reward_model(str(directory))
    expected = score_rows(net, rollout_rows(tokenizer, rollouts), tokenizer.pad_token_id)
    assert learner.score_rollouts(rollouts) == expected
    # the reward adapter is saved beside the policy in checkpoints and comes back
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "reward" / "reward_head.safetensors").exists()
    meta = json.loads((directory / "reward_model.json").read_text())
    other = directory.parent / "other_base"
    save_reward_model(net, other, "some/other-model", LoRAConfig(), "float32", {})
    assert meta["base_model"] == tiny_model_path
    fresh = new_learner(tiny_model_path, tokenizer.pad_token_id, seed=1, stages=("sft",))
    with pytest.raises(ValueError, match="trained on some/other-model"):
        fresh.load_reward_model(str(other))
