"""Rule-based rewards in TRL's batched contract (`registry.py`): one value per completion."""

from __future__ import annotations


def exact_match(completions: list[str], reference: list[str], **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is the reference."""
    return [1.0 if c.strip() == ref.strip() else 0.0
            for c, ref in zip(completions, reference, strict=True)]
