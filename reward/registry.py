"""Every reward function by name (`reward.fns` / `task.reward_fn`), and the one contract they
all follow: TRL's (`GRPOTrainer(reward_funcs=...)`), so a user's TRL reward function runs
unchanged:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

called on a batch, by keyword. `prompts` are the prompt strings, or for a conversational
dataset its message lists; `completions` the generated texts, or for conversational prompts
`[{"role": "assistant", "content": text}]` each; `columns` the dataset's other columns, one
list each (a built-in task's column is `reference`, its gold answer). None means "does not
apply to this sample" (its weight then goes to the other functions).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection

from ..common.configio import ConfigError
from .nlu import label_match
from .rules import boxed_format, exact_match, format_match, length_penalty, math_verify
from .vader import vader_compound

RewardFn = Callable[..., list[float | None]]
BATCH_ARGS = ("prompts", "completions", "completion_ids")  # what every call passes

REWARD_FNS: dict[str, RewardFn] = {
    "exact_match": exact_match, "label_match": label_match, "vader_compound": vader_compound,
    "math_verify": math_verify, "boxed_format": boxed_format, "length_penalty": length_penalty,
}
# built from a config key: name -> (the key, the function of its value)
CONFIGURED_FNS = {"format_regex": ("reward.format_regex", format_match)}
CONTRACT = "fn(prompts, completions, **kwargs) -> list[float | None] (TRL's reward contract)"


def get_reward_fn(name: str, key: str = "reward.fns",
                  settings: dict[str, str | None] | None = None) -> RewardFn:
    """A registered name, one built from its config key's value in `settings` (e.g.
    format_regex from reward.format_regex), or `package.module:function` for a user's own; a
    ConfigError naming `key` (the config key that gave `name`) otherwise."""
    forms = (f"use one of {', '.join([*REWARD_FNS, *CONFIGURED_FNS])} or "
             "package.module:function")
    module, colon, attr = name.partition(":")
    if name in CONFIGURED_FNS:
        setting, build = CONFIGURED_FNS[name]
        value = (settings or {}).get(setting)
        if value is None:
            raise ConfigError(f"{key}={name!r} needs {setting} (its pattern)")
        return build(value)
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


def check_reward_fn(fn: RewardFn, name: str, key: str, columns: Collection[str]) -> None:
    """Before any actor starts: `fn` takes the batch by keyword, and every argument it needs
    is a column of the dataset (`columns`)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: nothing to check up front
        return
    if any(p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY for p in params):
        raise ConfigError(f"{key}={name!r}: takes positional-only arguments; it is called by "
                          f"keyword as {CONTRACT}")
    names = {p.name for p in params}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    if "completions" not in names and not takes_any:
        raise ConfigError(f"{key}={name!r}: has no `completions` argument (and no **kwargs); "
                          f"the contract is {CONTRACT}")
    needed = [p.name for p in params if p.default is p.empty and p.name not in BATCH_ARGS
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = sorted((set(columns) | set(BATCH_ARGS)) - names) if not takes_any else []
    if unexpected:
        raise ConfigError(f"{key}={name!r}: does not accept {unexpected}, which every call "
                          f"passes; add **kwargs (the contract is {CONTRACT})")
    missing = [n for n in needed if n not in columns]
    if missing:
        raise ConfigError(f"{key}={name!r}: needs column(s) {missing}, which the prompt data "
                          f"lacks (its columns: {sorted(columns)})")
