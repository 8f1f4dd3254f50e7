"""`lorafleet bench demo`'s table: every stage's held-out figures per seed, their spread and the
smallest, and the gains the README quotes."""

from __future__ import annotations

import pytest

from helpers import numbers, table_cells
from lorafleet.cluster.bench.demo import demo_table


def summary(start: float, end: float, greedy_end: float) -> dict:
    return {
        "stage_evals": [{"stage": "start", "eval_reward": start, "eval_greedy": 0.05},
                        {"stage": "rl", "eval_reward": end, "eval_greedy": greedy_end}],
        "reward_first_iterations": 0.6, "reward_last_iterations": 0.9, "window": 10,
        "kl_last_iterations": 0.4, "wall_seconds": 90.0,
    }


def test_demo_table_spread_and_gains():
    cells = table_cells(demo_table([summary(0.25, 0.85, 0.95), summary(0.2, 0.9, 0.85)], [0, 1]))
    assert cells["figure"] == ["seed 0", "seed 1", "mean ± std", "min"]
    # per seed, mean ± std, min
    assert numbers(cells["held-out reward, sampled, after rl"]) == pytest.approx(
        [0.85, 0.9, 0.875, 0.035, 0.85])
    assert numbers(cells["train reward, last 10 iterations"]) == pytest.approx(
        [0.9, 0.9, 0.9, 0.0, 0.9])
    # the changes from the start, last: per seed and the smallest
    assert list(cells)[-2:] == ["held-out sampled, end / start", "held-out greedy, end - start"]
    assert numbers(cells["held-out sampled, end / start"]) == pytest.approx([3.4, 4.5, 3.4])
    assert numbers(cells["held-out greedy, end - start"]) == pytest.approx([0.9, 0.8, 0.8])
    # no ratio for a reward that starts at or below 0 (VADER's compound)
    cells = table_cells(demo_table([summary(-0.01, 0.5, 0.6)], [0]))
    assert "held-out sampled, end / start" not in cells
    assert numbers(cells["held-out greedy, end - start"]) == pytest.approx([0.55, 0.55])
