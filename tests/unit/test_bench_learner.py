"""`lorafleet bench learner`'s pieces: its synthetic batches are real updates of each policy
(prompt-major groups at the policy's version), and a timed round runs them."""

from __future__ import annotations

from dataclasses import replace

from lorafleet.cluster.bench.learner import SHAPES, build_learner, synthetic_batch, timed


def test_a_timed_round_updates_every_policy_it_names():
    shape = replace(SHAPES["small"], rows=16)
    learner, tokenizer = build_learner(shape, 2, threads=2, device="cpu")
    batch = synthetic_batch(tokenizer, shape, 0, "p1", seed=0)
    assert len(batch) == 16 and {s.rollout.policy for s in batch} == {"p1"}
    assert [s.rollout.sample_index for s in batch[:4]] == [0, 1, 2, 3]
    assert all(1 <= len(s.rollout.response_ids) <= shape.response_tokens for s in batch)
    seconds = timed(learner, tokenizer, shape, [["p0", "p1"]], repeats=1)
    assert seconds > 0
    # a warm-up round and a timed one: two joint updates of each policy
    assert [learner.get_version(name) for name in ("p0", "p1")] == [2, 2]
