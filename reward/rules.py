"""Rule-based rewards: pure functions of (response text, reference) -> float."""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[str, str], float]


def exact_match(response: str, reference: str) -> float:
    """1.0 when the response, stripped of surrounding whitespace, is the reference."""
    return 1.0 if response.strip() == reference.strip() else 0.0


def label_match(response: str, reference: str) -> float:
    """NLU: 1 if the answer is the gold label word, 0 if another label, the task's
    invalid_reward if none (see common/nlu.py)."""
    from ..common.nlu import label_reward

    return label_reward(response, reference)


def vader_compound(response: str, reference: str) -> float:
    """VADER's compound sentiment of the response, in [-1, 1] (the write_positive task)."""
    from ..common.vader_data import compound

    return compound(response)


REWARD_FNS: dict[str, RewardFn] = {
    "exact_match": exact_match, "label_match": label_match, "vader_compound": vader_compound,
}


def get_reward_fn(name: str) -> RewardFn:
    """A registered name, or `package.module:function` for a user's own rule."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import reward function {name!r}: {exc}") from exc
    if name not in REWARD_FNS:
        raise ValueError(
            f"unknown reward function {name!r}; allowed: {sorted(REWARD_FNS)} or 'module:function'"
        )
    return REWARD_FNS[name]
