"""The NLU-as-generation reward: does the generated answer name the gold label?"""

from __future__ import annotations

import json

from ..common.tasks.nlu import parse_answer
from ..common.tasks.nlu_metrics import INVALID
from .rules import Completion, completion_text


def label_match(completions: list[Completion], reference: list[str], **kwargs) -> list[float]:
    """1 if the answer maps to the gold label, 0 if to another label, the task's
    `invalid_reward` (0 or a penalty) if to none. `reference` is the NLU task's JSON (task,
    gold label id, label words, invalid reward: `common/tasks/nlu.py: make_reference`)."""
    return [label_reward(completion_text(c), json.loads(ref))
            for c, ref in zip(completions, reference, strict=True)]


def label_reward(completion: str, ref: dict) -> float:
    pred = parse_answer(completion, ref["labels"])
    if pred == INVALID:
        return float(ref["invalid_reward"])
    return 1.0 if pred == ref["gold"] else 0.0
