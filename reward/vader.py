"""VADER's sentiment as a reward (the write_positive task)."""

from __future__ import annotations

from ..common.tasks.vader import analyzer


def vader_compound(response: str, reference: str) -> float:
    """VADER's compound sentiment of the response, in [-1, 1]."""
    return float(analyzer().polarity_scores(response)["compound"])
