"""A learner checkpoint restores everything an update depends on: a restored learner's next
update is the same as the original's (adapters, value head, optimiser moments, RNG)."""

from __future__ import annotations

import torch

from helpers import contrast_batch, new_learner
from lorafleet.common.state_io import load_state, save_state
from lorafleet.learner.actor import train_one
from lorafleet.learner.algorithms.registry import algorithm


def algo_learner(name, model_path, tokenizer):
    algo = algorithm(name).config(minibatch_size=16)
    return new_learner(model_path, tokenizer.pad_token_id, algo)


def trainable(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.net.model.named_parameters()
            if p.requires_grad or "lora" in n}


def test_state_io_round_trip_keeps_int_keys_and_tensors(tmp_path):
    state = {"opt": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 1e-3}]},
             "rng": torch.get_rng_state(), "version": 7, "name": None}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["opt"]["state"][0]["step"].item() == 3.0 and 0 in back["opt"]["state"]
    assert torch.equal(back["rng"], state["rng"]) and back["version"] == 7
    assert back["opt"]["groups"] == [{"lr": 1e-3}] and back["name"] is None


def test_restored_ppo_learner_continues_identically(tmp_path, tiny_model_path, tokenizer):
    original = algo_learner("ppo", tiny_model_path, tokenizer)
    train_one(original, contrast_batch(tokenizer, original.version))
    original.save_checkpoint(str(tmp_path / "ckpt"))

    restored = algo_learner("ppo", tiny_model_path, tokenizer)
    assert restored.load_checkpoint(str(tmp_path / "ckpt")) == 1
    before = trainable(original)
    assert all(torch.equal(before[k], v) for k, v in trainable(restored).items())
    assert torch.equal(original.net.value_head.weight, restored.net.value_head.weight)

    # Same next update: needs the Adam moments and the minibatch shuffling RNG restored.
    a = train_one(original, contrast_batch(tokenizer, 1))
    b = train_one(restored, contrast_batch(tokenizer, 1))
    assert a.policy_loss == b.policy_loss and a.value_loss == b.value_loss
    after_a, after_b = trainable(original), trainable(restored)
    assert all(torch.allclose(after_a[k], after_b[k], atol=1e-7) for k in after_a)
    assert any(not torch.equal(before[k], after_a[k]) for k in before)


def test_a_half_written_checkpoint_is_ignored_and_dropped(tmp_path):
    """A kill while a checkpoint is written (its files, or its trainer state mid-write) leaves
    the previous checkpoint the one resumed from; rewinding removes the partial one."""
    from lorafleet.cluster.checkpoint import TRAINER_STATE, TrainerState, latest_checkpoint, rewind
    from lorafleet.common.run_dir import RunDir

    run_dir = RunDir(tmp_path)
    state = TrainerState(next_stage=0, next_iteration=4, prompt_cursor=64, metrics_lines=1,
                         stage_evals=[], adapter_version=4, reward_moments={})
    previous = run_dir.checkpoint("iter_00004")
    previous.mkdir(parents=True)
    state.write(previous)
    assert not list(previous.glob("*.partial"))
    partial = run_dir.checkpoint("iter_00006")
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\0" * 8)
    (partial / f"{TRAINER_STATE}.partial").write_text('{"next_stage": 0, "next_it')
    run_dir.metrics.write_text('{"iteration": 3}\n{"iteration": 4}\n')
    directory, found = latest_checkpoint(run_dir)
    assert directory == previous and found == state
    rewind(run_dir, found, directory)
    assert not partial.exists() and previous.exists()
    assert run_dir.metrics.read_text() == '{"iteration": 3}\n'
