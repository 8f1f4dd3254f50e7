"""Per-iteration response-length statistics, by hand."""

from __future__ import annotations

from lorafleet.common.metrics import response_lengths, summarize
from lorafleet.common.records import Prompt, Rollout


def test_response_lengths_and_truncated_share():
    prompt = Prompt(0, "1+1=", [5, 6], {"reference": "2"})
    rollouts = [
        Rollout(prompt, k, ids, "", [0.0] * len(ids), finish, 0, 0)
        for k, (ids, finish) in enumerate([([1, 2, 3], "length"), ([1], "stop"),
                                           ([1, 2], "stop"), ([1, 2, 3], "length")])
    ]
    assert response_lengths(rollouts) == {
        "response_tokens": 9, "response_length_mean": 2.25, "response_length_max": 3,
        "truncated_fraction": 0.5,
    }


def test_summary_without_a_reference_has_no_kl():
    """kl_coef 0: the learner makes no reference pass and logs kl None."""
    rows = [{"reward_mean": 0.5, "kl": kl, "step_seconds": 1.0, "rollout_tokens_per_s": 9.0,
             "sync_seconds": 0.1} for kl in (None, None)]
    assert summarize(rows)["kl_last_iterations"] is None
    rows = [r | {"kl": 0.25} for r in rows]
    assert summarize(rows)["kl_last_iterations"] == 0.25


def test_the_startup_clock_counts_the_process_start_once(monkeypatch):
    import time

    from lorafleet.common.startup import StartupClock

    monkeypatch.setattr(StartupClock, "process_start_counted", False)
    first = StartupClock()
    time.sleep(0.05)
    first.lap("Ray")
    assert list(first.phases) == ["python and imports", "Ray"]
    assert first.phases["python and imports"] > 0 and first.phases["Ray"] >= 0.05
    assert first.line().startswith(f"start-up {sum(first.phases.values()):.1f} s: python and "
                                   "imports ")
    second = StartupClock()  # a later run in the same process: its own start only
    second.lap("Ray")
    assert list(second.phases) == ["Ray"]
