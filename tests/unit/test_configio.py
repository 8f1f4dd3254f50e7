"""Tests for lorafleet.common.configio: strict dataclass configs from YAML plus overrides."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from lorafleet.common.configio import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class Rollout:
    num_workers: int = 2
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_accum: Literal[1, 2, 4] = 1


@dataclass
class Config:
    algo: Literal["ppo", "grpo"] = "grpo"
    seed: int | None = None
    debug: bool = False
    rollout: Rollout = field(default_factory=Rollout)
    optim: Optim = field(default_factory=Optim)
    tags: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.rollout.num_workers < 1:
            raise ConfigError(f"rollout.num_workers must be >= 1, got {self.rollout.num_workers}")


@dataclass
class Switch:
    autocast: Literal["auto", "off"] = "auto"


@dataclass
class Named:
    name: str


@dataclass
class Entries:
    entries: list[dict[str, Any]] = field(default_factory=list)
    extra: Any = None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_from_empty_data_none_path_and_empty_file(tmp_path: Path) -> None:
    assert from_dict(Config, {}) == Config()
    assert load_config(Config, None) == Config()
    assert load_config(Config, write(tmp_path, "")) == Config()


def test_file_values_and_nested_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "algo: ppo\nrollout:\n  num_workers: 4\n  temperature: 0.7\n")
    cfg = load_config(Config, path, ["rollout.num_workers=3", "optim.lr=0.5"])
    assert cfg.algo == "ppo"
    assert cfg.rollout == Rollout(num_workers=3, temperature=0.7)
    assert cfg.optim.lr == 0.5


def test_float_field_accepts_int_and_yaml11_exponent_strings(tmp_path: Path) -> None:
    cfg = from_dict(Config, {"rollout": {"temperature": 1}})
    assert cfg.rollout.temperature == 1.0 and type(cfg.rollout.temperature) is float
    # PyYAML reads `1e-5` as a string; float fields must still take it, from files and overrides.
    assert load_config(Config, write(tmp_path, "optim:\n  lr: 1e-5\n")).optim.lr == 1e-5
    assert load_config(Config, None, ["optim.lr=3e-6"]).optim.lr == 3e-6
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected float, got 'fast'$"):
        from_dict(Config, {"optim": {"lr": "fast"}})


def test_int_field_rejects_bool_and_float() -> None:
    with pytest.raises(ConfigError, match=r"^rollout\.num_workers: expected int, got True$"):
        from_dict(Config, {"rollout": {"num_workers": True}})
    with pytest.raises(ConfigError, match=r"^rollout\.num_workers: expected int, got 2\.5$"):
        load_config(Config, None, ["rollout.num_workers=2.5"])


def test_bool_text_only_accepted_from_overrides(tmp_path: Path) -> None:
    assert load_config(Config, None, ["debug=true"]).debug is True
    assert load_config(Config, None, ['debug="False"']).debug is False
    with pytest.raises(ConfigError, match=r"^debug: expected bool, got 'true'$"):
        load_config(Config, write(tmp_path, 'debug: "true"\n'))
    with pytest.raises(ConfigError, match=r"^debug: expected bool, got 1$"):
        from_dict(Config, {"debug": 1})


def test_literal_error_lists_allowed_values() -> None:
    assert load_config(Config, None, ["algo=ppo"]).algo == "ppo"
    with pytest.raises(ConfigError, match=r"^algo: expected one of 'ppo', 'grpo', got 'dpo'$"):
        load_config(Config, None, ["algo=dpo"])
    # True == 1 in Python, but a bool is not a valid member of an int Literal.
    expected = r"^optim\.grad_accum: expected one of 1, 2, 4, got True$"
    with pytest.raises(ConfigError, match=expected):
        from_dict(Config, {"optim": {"grad_accum": True}})
    # The declared member is stored, so 2.0 from YAML becomes the int 2.
    assert type(from_dict(Optim, {"grad_accum": 2.0}).grad_accum) is int


def test_literal_member_yaml_reads_as_a_bool(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare off as False: `autocast: off` in a file or `autocast=off` on the
    command line is still the member "off" (learner.autocast once rejected both)."""
    assert load_config(Switch, None, ["autocast=off"]).autocast == "off"
    assert load_config(Switch, write(tmp_path, "autocast: Off\n")).autocast == "off"
    with pytest.raises(ConfigError, match=r"^autocast: expected one of 'auto', 'off', got True$"):
        load_config(Switch, None, ["autocast=yes"])


def test_unknown_key_names_dotted_key_and_sorted_allowed_keys(tmp_path: Path) -> None:
    expected = re.escape(
        "unknown key(s) 'rollout.num_wrkers'; "
        "allowed keys in rollout: num_workers, stop, temperature"
    )
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        load_config(Config, write(tmp_path, "rollout:\n  num_wrkers: 3\n"))
    # The same key given as an override must fail the same way.
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        load_config(Config, None, ["rollout.num_wrkers=3"])


def test_unknown_top_level_section(tmp_path: Path) -> None:
    expected = re.escape(
        "unknown key(s) 'sampler'; allowed keys: algo, debug, optim, rollout, seed, tags"
    )
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        load_config(Config, write(tmp_path, "sampler:\n  top_k: 5\n"))
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        load_config(Config, None, ["sampler.top_k=5"])
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) 'optim\.a', 'optim\.b';"):
        from_dict(Config, {"optim": {"b": 1, "a": 2}})


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^rollout: expected a mapping \(section Rollout\)"):
        from_dict(Config, {"rollout": 4})


def test_list_tuple_and_dict_fields() -> None:
    overrides = ["rollout.stop=[a, b]", "optim.betas=[0.8, 1]", "tags.team=rl"]
    cfg = load_config(Config, None, overrides)
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.optim.betas == (0.8, 1.0)
    assert cfg.tags == {"team": "rl"}
    with pytest.raises(ConfigError, match=r"^rollout\.stop\[1\]: expected str, got 2$"):
        load_config(Config, None, ["rollout.stop=[a, 2]"])
    with pytest.raises(ConfigError, match=r"^rollout\.stop: expected list\[str\], got 'a'$"):
        load_config(Config, None, ["rollout.stop=a"])
    with pytest.raises(ConfigError, match=r"^tags\.team: expected str, got 7$"):
        from_dict(Config, {"tags": {"team": 7}})


def test_any_is_plain_yaml_data_copied(tmp_path: Path) -> None:
    data = {"entries": [{"name": "a", "algo": {"lr": 1e-3}, "tags": ["x"]}], "extra": [1, "b"]}
    cfg = from_dict(Entries, data)
    data["entries"][0]["algo"]["lr"] = 5.0
    data["extra"].append(2)
    assert cfg == Entries([{"name": "a", "algo": {"lr": 1e-3}, "tags": ["x"]}], [1, "b"])
    # strings from overrides come back as plain str, so the config dumps as YAML
    cfg = load_config(Entries, None, ["entries=[{name: b, s: text}]", "extra=word"])
    assert type(cfg.entries[0]["s"]) is str and type(cfg.extra) is str
    save_config(cfg, tmp_path / "entries.yaml")
    assert load_config(Entries, tmp_path / "entries.yaml") == cfg
    with pytest.raises(ConfigError, match=r"^entries\[1\]: expected dict\[str, Any\], got 3$"):
        from_dict(Entries, {"entries": [{}, 3]})
    with pytest.raises(ConfigError, match=r"^entries\[0\]: keys must be strings, got 1$"):
        from_dict(Entries, {"entries": [{1: "a"}]})


def test_optional_field() -> None:
    assert from_dict(Config, {"seed": None}).seed is None
    assert load_config(Config, None, ["seed=7"]).seed == 7
    assert load_config(Config, None, ["seed=7", "seed=null"]).seed is None
    with pytest.raises(ConfigError, match=r"^seed: expected int, got 'x'$"):
        load_config(Config, None, ["seed=x"])


def test_missing_required_key() -> None:
    assert from_dict(Named, {"name": "a"}) == Named("a")
    with pytest.raises(ConfigError, match=r"^missing required key\(s\): name$"):
        from_dict(Named, {})


def test_validate_hook_is_called() -> None:
    with pytest.raises(ConfigError, match=r"^rollout\.num_workers must be >= 1, got 0$"):
        load_config(Config, None, ["rollout.num_workers=0"])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"'rollout\.num_workers'.*dotted\.key=value"):
        apply_overrides({}, ["rollout.num_workers"])
    with pytest.raises(ConfigError, match=r"'a\.\.b=1'.*dotted\.key=value"):
        apply_overrides({}, ["a..b=1"])


def test_apply_overrides_parses_values_and_copies_input() -> None:
    data = {"rollout": {"num_workers": 2}}
    out = apply_overrides(data, ["rollout.num_workers=3", "a.b.c=[x, 1]", "s=[oops", "n=null"])
    assert out == {
        "rollout": {"num_workers": 3},
        "a": {"b": {"c": ["x", 1]}},
        "s": "[oops",
        "n": None,
    }
    assert data == {"rollout": {"num_workers": 2}}
    with pytest.raises(ConfigError, match=r"rollout\.num_workers is 2, not a section"):
        apply_overrides(data, ["rollout.num_workers.x=1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nalgo: ppo\n  debug: true\n")
    with pytest.raises(ConfigError, match=rf"^invalid YAML in {re.escape(str(path))} at line 3\b"):
        load_config(Config, path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    expected = rf"^{re.escape(str(path))}: top level must be a mapping, got list$"
    with pytest.raises(ConfigError, match=expected):
        load_config(Config, path)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^cannot read config file {re.escape(str(path))}:"):
        load_config(Config, path)


def test_to_dict_is_plain_data() -> None:
    data = to_dict(Config(optim=Optim(betas=(0.5, 0.6))))
    assert data["optim"] == {"lr": 1e-4, "betas": [0.5, 0.6], "grad_accum": 1}
    assert list(data) == ["algo", "seed", "debug", "rollout", "optim", "tags"]
    assert json.loads(json.dumps(data)) == data


def test_round_trip_save_then_load(tmp_path: Path) -> None:
    overrides = ["algo=ppo", "seed=3", "rollout.stop=[x]", "optim.lr=1e-5", "tags.team=rl"]
    cfg = load_config(Config, None, overrides)
    assert cfg != Config()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Config, path) == cfg
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.9, 0.999]


@dataclass
class Shape:
    kind: str = "circle"

    @classmethod
    def config_class(cls, data, prefix):
        return {"circle": Circle, "square": Square}[data.get("kind", cls.kind)]

    @classmethod
    def unknown_keys_hint(cls, keys):
        return f" (a {cls.kind})"


@dataclass
class Circle(Shape):
    radius: float = 1.0


@dataclass
class Square(Shape):
    kind: str = "square"
    side: float = 2.0


@dataclass
class Drawing:
    shape: Shape = field(default_factory=Circle)


def test_config_class_hook_picks_the_section_dataclass(tmp_path: Path) -> None:
    path = write(tmp_path, "shape: {kind: square, side: 3}\n")
    assert load_config(Drawing, path).shape == Square(side=3.0)
    assert load_config(Drawing, None, ["shape.radius=2"]).shape == Circle(radius=2.0)
    # an override switches the dataclass; keys only the other one has are then unknown
    with pytest.raises(ConfigError, match=r"'shape.side'; allowed keys in shape: kind, radius "
                                          r"\(a circle\)"):
        load_config(Drawing, path, ["shape.kind=circle"])
    saved = tmp_path / "saved.yaml"
    save_config(load_config(Drawing, path), saved)
    assert load_config(Drawing, saved).shape == Square(side=3.0)
