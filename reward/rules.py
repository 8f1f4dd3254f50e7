"""Rule-based rewards in TRL's batched contract (`registry.py`): one value per completion."""

from __future__ import annotations

import re
import threading

Completion = str | list[dict[str, str]]  # text, or [{"role": "assistant", "content": text}]


def completion_text(completion: Completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(completions: list[Completion], reference: list[str], **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is the reference."""
    return [1.0 if completion_text(c).strip() == ref.strip() else 0.0
            for c, ref in zip(completions, reference, strict=True)]


def math_verify(completions: list[Completion], answer: list[str], **kwargs) -> list[float]:
    """1.0 where HF's math-verify finds the completion's final answer (\\boxed{...}, `#### 42`,
    a fraction, LaTeX, a plain number) equal to the `answer` column's (parsed the same way:
    GSM8K's worked answers ending in `#### 72` work as they are)."""
    from math_verify import parse, verify

    # its timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return [
        float(verify(parse(str(gold), parsing_timeout=timeout),
                     parse(completion_text(c), parsing_timeout=timeout), timeout_seconds=timeout))
        for c, gold in zip(completions, answer, strict=True)
    ]


def format_match(pattern: str):
    """The format reward of `pattern` (`reward.format_regex`): 1.0 where the completion
    contains a match (`re.search`, `.` matching newlines too), else 0.0; pair it with a
    correctness reward by weight."""
    compiled = re.compile(pattern, re.DOTALL)

    def format_regex(completions: list[Completion], **kwargs) -> list[float]:
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    return format_regex


# an answer stated as \boxed{...}
boxed_format = format_match(r"\\boxed\{[^{}]+\}")


def length_penalty(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """Minus the completion's length in tokens; reward.weights sets the price of a token."""
    return [-float(len(ids)) for ids in completion_ids]
