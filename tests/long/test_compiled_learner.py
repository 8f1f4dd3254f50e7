"""learner.compile (torch.compile of the learner's forward passes) takes the same updates as
the eager learner. About 70 s on 2 cores with a cold inductor cache (the compile itself), so
it lives in the long tier; `lorafleet bench vs-trl` runs the compiled learner at its large
scale."""

from __future__ import annotations

import pytest

from helpers import contrast_batch, new_learner
from lorafleet.learner.actor import train_one
from lorafleet.learner.algorithms.registry import GRPOConfig


def test_a_compiled_learner_takes_the_same_steps(tiny_model_path, tokenizer):
    """learner.compile: the same GRPO updates as the eager learner, to float32 rounding (no KL
    term: one graph to compile, the policy's forward with its backward)."""
    learners = [new_learner(tiny_model_path, tokenizer.pad_token_id,
                            algo=GRPOConfig(kl_coef=0.0), compile=compiled)
                for compiled in (False, True)]
    for _ in range(2):  # the second step reuses the first's graph, on the updated adapter
        stats = [train_one(learner, contrast_batch(tokenizer, learner.version))
                 for learner in learners]
        assert stats[1].policy_loss == pytest.approx(stats[0].policy_loss, abs=1e-5)
        assert stats[1].grad_norm == pytest.approx(stats[0].grad_norm, rel=1e-4)
