"""Per-iteration response-length statistics, by hand."""

from __future__ import annotations

from lorafleet.common.metrics import response_lengths
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
