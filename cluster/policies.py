"""Several policies in one run: the `policies:` section, each entry a name and overrides of the
run config's per-policy keys (`{name: b, seed: 1, algo: {policy_lr: 3e-4}}`, nested mappings
or dotted keys). Every other key is shared: the policies train on one base model served by
one fleet. `expand_policies` gives each policy's own full config; `sweep_policies` turns
`key=a,b` command-line items into policy entries.

The run config (cluster/config.py) checks its `policies:` section with `expand_policies` from
its `validate`, so this module reads the config through its instance, not its class.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..common.config import TINY
from ..common.configio import ConfigError, from_dict, parse_value, set_dotted, to_dict
from ..learner.algorithms.registry import algorithm, config_keys

Config = TypeVar("Config")  # the run config, cluster/config.py's TrainConfig

# What a policy may set: a key, or a whole section by its name.
PER_POLICY_KEYS = (
    "seed", "prompts_per_iteration", "eval_every", "task", "lora", "algo",
    "rollout.samples_per_prompt", "rollout.temperature", "rollout.max_new_tokens",
    "rollout.stop", "rollout.stop_token_ids", "rollout.too_long_prompts",
    "rollout.probe_prompts", "rollout.mode", "rollout.max_staleness",
    "rollout.max_behaviour_weight",
    "reward.fns", "reward.weights", "reward.format_regex", "reward.rule_weight", "reward.model",
    "reward.model_weight", "reward.normalize", "reward.clip", "reward.on_error",
)
# A policy's name is its vLLM LoRA's and its run directory's; the learner names its PEFT
# adapters itself, so no name is reserved.
NAME_CHARACTERS = "A-Za-z0-9_=+-"
NAME = re.compile(f"[A-Za-z0-9][{NAME_CHARACTERS}]*")
MAX_NAME_LENGTH = 64
# The task keys a policy may change on the embedded model: the others are its recipe.
TINY_TASK_KEYS = ("reward_fn",)


def is_per_policy(key: str) -> bool:
    """Whether the dotted `key` is one a policy may set (PER_POLICY_KEYS)."""
    return any(key == k or key.startswith(f"{k}.") for k in PER_POLICY_KEYS)


def expand_policies(cfg: Config) -> list[tuple[str, Config]]:
    """Each policy's name and full config: the top level with the policy's overrides,
    `policies` empty and `run_dir` RUN_DIR/<name>; [] when the run has no `policies:` section.
    A bad entry raises one line naming the policy and the key."""
    entries = cfg.policies
    if not entries:
        return []
    if cfg.stages != ["rl"]:
        raise ConfigError(f"policies: several policies train only in the rl stage; this run "
                          f"has stages {cfg.stages} (set stages: [rl] or drop policies)")
    if len(entries) > cfg.rollout.max_loras:
        raise ConfigError(f"policies: {len(entries)} policies, but each rollout engine serves "
                          f"rollout.max_loras={cfg.rollout.max_loras} adapters at once (raise "
                          "it: every slot reserves one adapter's memory in every engine)")
    names = [policy_name(i, entry) for i, entry in enumerate(entries)]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"policies[{name}]: two policies are named {name!r}")
    base = to_dict(cfg)
    return [(name, policy_config(cfg, base, name, entry))
            for name, entry in zip(names, entries, strict=True)]


def policy_name(index: int, entry: Mapping[str, Any]) -> str:
    name = entry.get("name")
    if name is None:
        raise ConfigError(f"policies[{index}]: name is missing (each policy is named, e.g. "
                          "`- {name: lr3e-4, algo.policy_lr: 3e-4}`)")
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"policies[{index}]: name {name!r} must be letters, digits and "
                          f"_=+- (starting with a letter or digit), at most {MAX_NAME_LENGTH} "
                          "characters")
    return name


def policy_config(cfg: Config, base: dict[str, Any], name: str, entry: Mapping[str, Any]
                  ) -> Config:
    """The config of the policy `entry` (named `name`); base: to_dict(cfg)."""
    try:
        return merged_config(cfg, base, name, flatten({k: v for k, v in entry.items()
                                                       if k != "name"}))
    except ConfigError as exc:
        raise ConfigError(f"policies[{name}]: {exc}") from None


def merged_config(cfg: Config, base: dict[str, Any], name: str, overrides: dict[str, Any]
                  ) -> Config:
    data = {**copy.deepcopy(base), "policies": [], "late_policy_wait_s": None,
            "run_dir": str(Path(cfg.run_dir, name))}
    # A policy that picks another algorithm or task keeps the top level's settings of that
    # section that the new one reads, not the old one's defaults.
    algo, task = overrides.get("algo.name"), overrides.get("task.name")
    if isinstance(algo, str) and algo != cfg.algo.name:
        data["algo"] = set_keys(cfg.algo, config_keys(algorithm(algo).config))
    if isinstance(task, str) and task != cfg.task.name:
        data["task"] = set_keys(cfg.task, set(base["task"]))
    for key, value in overrides.items():
        set_dotted(data, key.split("."), value, key)
    policy = from_dict(type(cfg), data)
    for key in overrides:
        if not is_per_policy(key):
            raise ConfigError(f"{key} is shared by every policy (one base model, one fleet); "
                              "set it at the top level")
    if cfg.model.name_or_path == TINY:
        check_tiny_task(cfg.task, policy.task)
    return policy


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys to their leaf values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def set_keys(section: Any, read: set[str]) -> dict[str, Any]:
    """The keys of `section` (algo or task) in `read` whose values differ from the defaults
    of the section's own algorithm or task."""
    defaults = to_dict(type(section)(name=section.name))
    return {k: v for k, v in to_dict(section).items()
            if k != "name" and k in read and v != defaults[k]}


def check_tiny_task(top: Any, own: Any) -> None:
    """The embedded model is built from the task (its recipe) and the policies share one base
    model, so on it a policy's task differs from the top level's only in TINY_TASK_KEYS."""
    ours, theirs = flatten(to_dict(top)), flatten(to_dict(own))
    for key in ours.keys() | theirs.keys():
        if key not in TINY_TASK_KEYS and ours.get(key) != theirs.get(key):
            raise ConfigError(
                f"task.{key}: with model.name_or_path={TINY} the base model is built "
                "from the task, and the policies share one base model; set it at the top "
                "level, or give model.name_or_path a model directory")


def sweep_policies(assignments: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """`key=a,b` items as the cartesian product of their values, one policy entry each, named
    like `policy_lr=1e-4_seed=0` (each key's last part); the other items (no comma, or a
    value that is one YAML list or mapping) are returned as they are, plain overrides."""
    swept: list[tuple[str, list[str]]] = []
    overrides = []
    for item in assignments:
        key, _, raw = item.partition("=")
        if "," in raw and not raw.lstrip().startswith(("[", "{")):
            swept.append((key.strip(), raw.split(",")))
        else:
            overrides.append(item)
    if not swept:
        return [], overrides
    keys = [key for key, _ in swept]
    policies = []
    for values in itertools.product(*(values for _, values in swept)):
        chosen = list(zip(keys, values, strict=True))
        label = "_".join(f"{key.rpartition('.')[2]}={value.strip()}" for key, value in chosen)
        policies.append({**{key: parse_value(value) for key, value in chosen},
                         "name": re.sub(f"[^{NAME_CHARACTERS}]", "-", label)})
    return policies, overrides
