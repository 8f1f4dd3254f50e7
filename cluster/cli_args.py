"""What the `lorafleet` verbs share in reading their arguments (cluster/cli.py, and the bench
verb's own module cluster/bench/cli.py)."""

from __future__ import annotations

from ..common.configio import ConfigError


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"{flag}: comma-separated integers, got {text!r}") from exc


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise ConfigError(f"expected one CONFIG.yaml and key=value overrides, got {item!r}")
    return config, overrides
