"""`bench async`'s figures: sync rows derive the waits from their timings by the definitions
async rows log them with; the slow reward is the task's exact match."""

from __future__ import annotations

import pytest

from helpers import numbers
from lorafleet.cluster.bench.async_mode import (
    WARMUP_ITERATIONS,
    exact_match_slow,
    loop_figures,
    mode_cells,
)


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


def test_async_rows_carry_their_ratio_to_sync():
    figures = {"sync": {"samples_per_s": 50.0, "learner_wait_s": 2.0, "workers_wait_s": 3.0},
               "async": {"samples_per_s": 75.0, "learner_wait_s": 0.5, "workers_wait_s": 1.5}}
    rows = [{"reward_mean": r} for r in (0.1, 0.2, 0.3, 0.5, 0.6, 0.7)]
    sync = mode_cells(figures, "sync", rows)
    assert numbers(sync) == pytest.approx([50.0, 2.0, 3.0, 0.2, 0.6])
    # async / sync, same setting and seed
    assert numbers(mode_cells(figures, "async", rows)) == pytest.approx(
        [75.0, 1.5, 0.5, 0.25, 1.5, 0.5, 0.2, 0.6])
