"""Rule-based rewards: pure functions of (response text, reference) -> float."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..common.configio import ConfigError

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


def get_reward_fn(name: str, key: str = "reward.fn") -> RewardFn:
    """A registered name, or `package.module:function` for a user's own rule; a ConfigError
    naming `key` (the config key that gave `name`) otherwise."""
    forms = f"use one of {', '.join(REWARD_FNS)} or package.module:function"
    module, colon, attr = name.partition(":")
    if not colon:
        if name not in REWARD_FNS:
            raise ConfigError(f"{key}={name!r}: unknown reward function; {forms}")
        return REWARD_FNS[name]
    try:
        fn = getattr(importlib.import_module(module), attr) if module and attr else None
    except ImportError as exc:
        raise ConfigError(f"{key}={name!r}: cannot import {module!r} ({exc}); {forms}, with the "
                          "module importable by the driver and the reward actors") from exc
    except AttributeError as exc:
        raise ConfigError(f"{key}={name!r}: module {module!r} has no {attr!r}; {forms}") from exc
    if not callable(fn):
        raise ConfigError(f"{key}={name!r}: not a function; {forms}")
    return fn
