"""`bench async`'s figures: sync rows derive the waits from their timings by the definitions
async rows log them with; the slow reward is the task's exact match."""

from __future__ import annotations

import pytest

from lorafleet.cluster.bench.async_mode import WARMUP_ITERATIONS, exact_match_slow, loop_figures


def test_loop_figures_of_sync_and_async_rows():
    warm = [{}] * WARMUP_ITERATIONS  # left out
    # sync: 4 s per iteration, 1.5 s training, 600 tokens at 1200 tok/s = 0.5 s generating
    sync = {"samples": 256, "step_seconds": 4.0, "train_seconds": 1.5,
            "response_tokens": 600, "rollout_tokens_per_s": 1200.0}
    assert loop_figures(warm + [sync]) == pytest.approx(
        {"samples_per_s": 64.0, "learner_wait_s": 2.5, "workers_wait_s": 3.5})
    logged = {"samples": 256, "step_seconds": 2.0, "learner_wait_seconds": 0.25,
              "workers_wait_seconds": 0.5}
    assert loop_figures(warm + [logged] * 3) == pytest.approx(
        {"samples_per_s": 128.0, "learner_wait_s": 0.25, "workers_wait_s": 0.5})


def test_slow_reward_is_exact_match():
    assert exact_match_slow(completions=["12", " 7 ", "3"], reference=["12", "7", "4"],
                            prompts=["", "", ""]) == [1.0, 1.0, 0.0]
