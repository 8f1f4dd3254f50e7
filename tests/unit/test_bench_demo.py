"""`lorafleet bench demo`'s table: every stage's held-out figures per seed, their spread and the
smallest, and the gains the README quotes."""

from __future__ import annotations

from lorafleet.cluster.bench.demo import demo_table


def summary(start: float, end: float, greedy_end: float) -> dict:
    return {
        "stage_evals": [{"stage": "start", "eval_reward": start, "eval_greedy": 0.05},
                        {"stage": "rl", "eval_reward": end, "eval_greedy": greedy_end}],
        "reward_first_iterations": 0.6, "reward_last_iterations": 0.9, "window": 10,
        "kl_last_iterations": 0.4, "wall_seconds": 90.0,
    }


def test_demo_table_spread_and_gains():
    rows = demo_table([summary(0.25, 0.85, 0.95), summary(0.2, 0.9, 0.85)], [0, 1]).splitlines()
    assert rows[0] == "| figure | seed 0 | seed 1 | mean ± std | min |"
    assert "| held-out reward, sampled, after rl | 0.850 | 0.900 | 0.875 ± 0.035 | 0.850 |" in rows
    assert "| train reward, last 10 iterations | 0.900 | 0.900 | 0.900 ± 0.000 | 0.900 |" in rows
    assert rows[-2] == "| held-out sampled, end / start | 3.40x | 4.50x | | 3.40x |"
    assert rows[-1] == "| held-out greedy, end - start | +0.900 | +0.800 | | +0.800 |"
    # no ratio for a reward that starts at or below 0 (VADER's compound)
    table = demo_table([summary(-0.01, 0.5, 0.6)], [0])
    assert "end / start" not in table and "| +0.550 |" in table
