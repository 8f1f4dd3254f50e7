"""`lorafleet validate PATH...`: cluster launcher YAMLs through Ray's own validator (the one
`ray up` runs), KubeRay RayJob manifests against the shape the operator needs, and in both
that the nodes install lorafleet."""

from __future__ import annotations

from pathlib import Path

import yaml


def validate_file(path: Path) -> list[str]:
    """The problems found in one file (empty when it is valid)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"cannot read as YAML: {exc}"]
    if not isinstance(doc, dict):
        return ["expected a YAML mapping at the top level"]
    if doc.get("kind") == "RayJob":
        return rayjob_problems(doc)
    return cluster_problems(doc)


def cluster_problems(config: dict) -> list[str]:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(config))
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        return [f"{where}: {exc.message}"]
    except Exception as exc:  # Ray raises ValueError/KeyError/RuntimeError for semantic errors
        return [f"{type(exc).__name__}: {exc}"]
    commands = config.get("setup_commands", []) + config.get("head_setup_commands", [])
    if not any("lorafleet" in str(c) for c in commands):
        return ["setup_commands: no command installs lorafleet (e.g. pip install -e "
                "\"~/lorafleet[gpu]\" with file_mounts {~/lorafleet: .})"]
    return []


def rayjob_problems(doc: dict) -> list[str]:
    problems = []

    def need(mapping: object, key: str, where: str, kind: type = dict) -> object:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(value, kind):
            problems.append(f"{where}.{key}: missing or not a {kind.__name__}")
            return None
        return value

    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    spec = need(doc, "spec", "")
    need(doc, "metadata", "") and need(doc["metadata"], "name", "metadata", str)
    if spec is None:
        return problems
    entrypoint = need(spec, "entrypoint", "spec", str)
    if entrypoint is not None and "lorafleet" not in entrypoint:
        problems.append("spec.entrypoint: does not run lorafleet")
    cluster = need(spec, "rayClusterSpec", "spec")
    if cluster is None:
        return problems
    head = need(cluster, "headGroupSpec", "spec.rayClusterSpec")
    groups = [("spec.rayClusterSpec.headGroupSpec", head)] if head else []
    workers = cluster.get("workerGroupSpecs", [])
    if not isinstance(workers, list):
        problems.append("spec.rayClusterSpec.workerGroupSpecs: not a list")
        workers = []
    for i, group in enumerate(workers):
        where = f"spec.rayClusterSpec.workerGroupSpecs[{i}]"
        need(group, "groupName", where, str)
        if not isinstance(group.get("replicas", 0), int):
            problems.append(f"{where}.replicas: not an integer")
        groups.append((where, group))
    for where, group in groups:
        if not isinstance(group, dict):
            problems.append(f"{where}: not a mapping")
            continue
        pod = need(group, "template", where)
        pod_spec = need(pod, "spec", f"{where}.template") if pod else None
        containers = need(pod_spec, "containers", f"{where}.template.spec", list) if pod_spec \
            else None
        for k, container in enumerate(containers or []):
            if not isinstance(container, dict) or not container.get("image"):
                problems.append(f"{where}.template.spec.containers[{k}].image: missing")
    return problems


def validate(paths: list[str]) -> bool:
    """Print a verdict per file; True when all are valid."""
    ok = True
    for name in paths:
        problems = validate_file(Path(name))
        ok &= not problems
        print(f"{name}: {'ok' if not problems else 'INVALID'}")
        for problem in problems:
            print(f"  - {problem}")
    return ok
