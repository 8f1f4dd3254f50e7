"""Every shipped cluster file passes `lorafleet validate`; broken ones are rejected with the
offending key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafleet.cluster.validate import validate, validate_file

CLUSTER = Path(__file__).parents[2] / "deploy" / "cluster"
SHIPPED = sorted(CLUSTER.glob("*.yaml"))


# What each shipped file must be: its provider (or kind), by content, not by name.
KINDS = {"aws.yaml": "aws", "gcp.yaml": "gcp", "local.yaml": "local",
         "kuberay-rayjob.yaml": "RayJob"}


@pytest.mark.parametrize(("name", "kind"), KINDS.items())
def test_every_cloud_has_a_file_of_its_kind(name, kind):
    doc = yaml.safe_load((CLUSTER / name).read_text())
    assert doc.get("kind", doc.get("provider", {}).get("type")) == kind
    if kind == "RayJob":  # it runs a config this repository ships
        config = doc["spec"]["entrypoint"].split()[2]
        assert (CLUSTER.parent / "configs" / Path(config).name).is_file(), config


def test_a_minimal_hand_written_cluster_is_accepted_and_needs_lorafleet(tmp_path):
    """Accepted by content: a file written here from scratch, not a copy of a shipped one."""
    minimal = {
        "cluster_name": "mini", "provider": {"type": "local", "head_ip": "10.1.1.1",
                                             "worker_ips": []},
        "auth": {"ssh_user": "me"},
        "setup_commands": ["pip install lorafleet"],
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(minimal))
    assert validate_file(path) == []
    path.write_text(yaml.safe_dump({**minimal, "setup_commands": ["pip install torch"]}))
    assert any("lorafleet" in p for p in validate_file(path))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_are_valid(path):
    assert validate_file(path) == []


def broken(tmp_path, name: str, edit) -> Path:
    doc = yaml.safe_load((CLUSTER / name).read_text())
    edit(doc)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc))
    return out


BROKEN = [
    ("aws.yaml", lambda d: d.update(max_workers="four"), "max_workers"),
    ("aws.yaml", lambda d: d.update(provder={"type": "aws"}), "provder"),
    ("gcp.yaml", lambda d: d["available_node_types"]["head"].pop("node_config"), "node_config"),
    ("local.yaml", lambda d: d.update(setup_commands=["pip install torch"]), "lorafleet"),
    ("kuberay-rayjob.yaml", lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint"),
    ("kuberay-rayjob.yaml",
     lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
     "workerGroupSpecs[0].groupName"),
    ("kuberay-rayjob.yaml", lambda d: d.update(apiVersion="ray.io/v0"), "apiVersion"),
]


@pytest.mark.parametrize(("name", "edit", "named"), BROKEN)
def test_broken_files_are_rejected_naming_the_key(name, edit, named, tmp_path):
    problems = validate_file(broken(tmp_path, name, edit))
    assert problems and any(named in p for p in problems), problems


def test_validate_prints_a_verdict_per_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("provider: [unclosed\n")
    assert validate([str(SHIPPED[0])]) is True
    assert validate([str(SHIPPED[0]), str(bad)]) is False
    out = capsys.readouterr().out
    assert "bad.yaml: INVALID" in out and "cannot read as YAML" in out


def test_train_config_fits_the_node_types_or_names_what_does_not(tmp_path, capsys):
    """The shipped GPU config fits every cloud's node types; a worker asking for two GPUs
    (tensor parallel) fits none of them (1 GPU per node), named with its keys."""
    gpu = str(CLUSTER.parent / "configs" / "gpu.yaml")
    clouds = [str(CLUSTER / n) for n in ("aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml")]
    assert validate(clouds + [str(CLUSTER / "local.yaml")], gpu) is True
    out = capsys.readouterr().out
    assert out.count("ok, holds") == 3 and "local provider's machines report" in out
    tp = tmp_path / "tp.yaml"
    tp.write_text((CLUSTER.parent / "configs" / "gpu.yaml").read_text().replace(
        "num_gpus_per_worker: 1", "num_gpus_per_worker: 2\n  tensor_parallel_size: 2"))
    assert validate(clouds, str(tp)) is False
    out = capsys.readouterr().out
    assert out.count("no node type holds a rollout actor's {'CPU': 2.0, 'GPU': 2.0} "
                     "(rollout.cpus_per_worker, rollout.num_gpus_per_worker)") == 3
    undeclared = broken(tmp_path, "aws.yaml",
                        lambda d: d["available_node_types"]["gpu_worker"].update(resources={}))
    assert validate([str(undeclared)], gpu) is False
    assert "node types ['gpu_worker'] declare no resources" in capsys.readouterr().out
