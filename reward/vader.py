"""VADER's sentiment as a reward (the write_positive task)."""

from __future__ import annotations

from ..common.tasks.vader import analyzer
from .rules import Completion, completion_text


def vader_compound(completions: list[Completion], **kwargs) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1]."""
    return [float(analyzer().polarity_scores(completion_text(c))["compound"])
            for c in completions]
