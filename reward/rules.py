"""Rule-based rewards: pure functions of (response text, reference) -> float."""

from __future__ import annotations


def exact_match(response: str, reference: str) -> float:
    """1.0 when the response, stripped of surrounding whitespace, is the reference."""
    return 1.0 if response.strip() == reference.strip() else 0.0
