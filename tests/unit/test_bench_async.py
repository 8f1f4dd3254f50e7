"""`bench async`'s figures: medians of the rows' own figures past the warm-up; the slow reward
is the task's exact match."""

from __future__ import annotations

import pytest

from helpers import numbers
from lorafleet.cluster.bench.async_mode import (
    WARMUP_ITERATIONS,
    exact_match_slow,
    loop_figures,
    mode_cells,
)


def test_loop_figures_are_medians_past_the_warm_up():
    warm = [{}] * WARMUP_ITERATIONS  # left out

    def row(samples_per_s, learner_wait, workers_wait):
        return {"samples_per_s": samples_per_s, "learner_wait_seconds": learner_wait,
                "workers_wait_seconds": workers_wait}

    rows = [row(128.0, 0.25, 0.5), row(64.0, 2.5, 3.5), row(100.0, 1.0, 0.75)]
    assert loop_figures(warm + rows) == pytest.approx(
        {"samples_per_s": 100.0, "learner_wait_s": 1.0, "workers_wait_s": 0.75})


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
