"""Strict loading of nested dataclass configs from YAML files plus `dotted.key=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

# PyYAML follows YAML 1.1, which reads `1e-5` (no dot, no exponent sign) as a string.
_SCI_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """Invalid configuration; the message names the dotted key and what is allowed."""


YAML_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


class _OverrideStr(str):
    """A string that came from a command-line override; only these may spell a bool as text."""


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    # init=False fields are derived state: never read from or written to config files.
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    return ConfigError(f"{key}: expected {name}, got {value!r}")


def _plain_data(value: Any) -> Any:
    """A deep copy of YAML data as plain dicts, lists and scalars (override strings as str)."""
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_data(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return copy.deepcopy(value)


def _convert(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:  # plain YAML data, read by the config's own code (e.g. `policies` entries)
        return _plain_data(value)
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return None if value is None else _convert(inner, value, key)
    if origin is Literal:
        for allowed in args:
            # True == 1, so bool-ness must match too; return the declared member, not the input.
            if value == allowed and isinstance(value, bool) == isinstance(allowed, bool):
                return allowed
            # YAML 1.1 reads a bare off / no (on / yes) as a bool: `autocast: off` means "off"
            if isinstance(value, bool) and str(allowed).lower() in YAML_BOOL_WORDS[value]:
                return allowed
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
    if (origin is list and len(args) == 1) or (origin is tuple and args[1:] == (Ellipsis,)):
        if not isinstance(value, list | tuple):
            raise _wrong_type(key, tp, value)
        items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict and len(args) == 2 and args[0] is str:
        if not isinstance(value, Mapping):
            raise _wrong_type(key, tp, value)
        for k in value:
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
        return {k: _convert(args[1], v, _join(key, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        # A shell-quoted override (flag='"true"') reaches us as text; files must use real bools.
        if isinstance(value, _OverrideStr) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp in (int, float):
        # bool is an int subclass, but `num_workers: true` is surely a mistake.
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and (tp is float or isinstance(value, int)):
            return tp(value)
        if tp is float and isinstance(value, str) and _SCI_FLOAT.fullmatch(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return str(value)  # drops the _OverrideStr marker so results dump as plain YAML
    else:
        raise TypeError(f"{key}: unsupported config field type {tp!r}")
    raise _wrong_type(key, tp, value)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from plain data; missing keys keep defaults, unknown keys fail.

    A section whose keys depend on one of its values (`algo.name` picks the algorithm's
    dataclass) defines the classmethods `config_class(data, prefix)`, returning the dataclass
    to build, and optionally `unknown_keys_hint(keys)`, text added to the unknown-key error.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<top level>'}: expected a mapping, got {data!r}")
    config_class = getattr(cls, "config_class", None)
    if config_class is not None:
        cls = config_class(data, prefix)
    fields = _init_fields(cls)
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        hint = getattr(cls, "unknown_keys_hint", None)
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(_join(prefix, k)) for k in unknown)}; "
            f"allowed keys{where}: {', '.join(sorted(fields))}"
            + (hint([str(k) for k in unknown]) if hint else "")
        )
    required = [k for k, f in fields.items() if f.default is f.default_factory is MISSING]
    missing = [_join(prefix, k) for k in required if k not in data]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    hints = get_type_hints(cls)
    obj = cls(**{k: _convert(hints[k], v, _join(prefix, k)) for k, v in data.items()})
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Turn a dataclass instance into plain dicts/lists/scalars for yaml.safe_dump or json."""
    return {name: _plain(getattr(obj, name)) for name in _init_fields(type(obj))}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `dotted.key=value` set; values are parsed as YAML."""
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or "" in parts:
            raise ConfigError(f"bad override {item!r}: use the form dotted.key=value, e.g. a.b=3")
        value = parse_value(raw)
        if isinstance(value, str):
            value = _OverrideStr(value)
        set_dotted(result, parts, value, f"bad override {item!r}")
    return result


def parse_value(raw: str) -> Any:
    """A command-line value: parsed as YAML, or the text itself where it is not YAML."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict[str, Any], parts: Sequence[str], value: Any, where: str) -> None:
    """Set `data[parts[0]][parts[1]]... = value` in place, creating missing sections; a
    section that holds a value instead raises ConfigError starting with `where`."""
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is {node!r}, not a section")
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at `path` (None: all defaults), apply overrides, and build `cls` strictly."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from exc
        if data is None:  # an empty file means "all defaults"
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(obj: Any, path: str | Path) -> None:
    """Write `obj` as YAML in field order, readable back with load_config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
