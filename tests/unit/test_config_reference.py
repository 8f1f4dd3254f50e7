"""docs/configuration.md is what the config dataclasses say now (`lorafleet config-reference`)."""

from dataclasses import fields
from pathlib import Path

from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.config_reference import field_comments, render
from lorafleet.cluster.policies import expand_policies
from lorafleet.common.config import MeetConfig, RolloutConfig

REFERENCE = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_reference_is_current():
    assert REFERENCE.read_text() == render(), (
        "docs/configuration.md differs from the config dataclasses: regenerate it with "
        "`lorafleet config-reference` at the repository root")


def test_every_meet_key_has_a_row():
    meet = render().split("## `meet`")[1].split("\n## ")[0]
    keys = [f.name for f in fields(MeetConfig)]
    assert len(keys) == 15
    for key in keys:
        assert f"| `{key}` |" in meet, key


def test_comments_above_and_beside_a_field():
    comments = field_comments(RolloutConfig)
    assert comments["probe_prompts"] == ("prompts of the fixed probe that verifies every "
                                         "adapter sync")
    assert comments["too_long_prompts"].startswith("prompts longer than model.max_model_len")
    assert comments["too_long_prompts"].endswith("counted in the output and summary.json")
    assert comments["temperature"] == ""  # nothing above it but another field


def test_policies_section_example_loads(tmp_path):
    section = render().split("## `policies`")[1].split("\n## ")[0]
    example = section.split("```yaml\n")[1].split("```")[0]
    path = tmp_path / "policies.yaml"
    path.write_text(example)
    names = [name for name, _ in expand_policies(load_train_config(path))]
    assert names == ["seed1", "lr3e-4"]
    assert "`task.*`" in section and "`rollout.temperature`" in section
