"""Every reward function by name: the rules a config's `reward.fn` / `task.reward_fn` names."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..common.configio import ConfigError
from .nlu import label_match
from .rules import exact_match
from .vader import vader_compound

RewardFn = Callable[[str, str], float]  # (response text, reference) -> reward

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
