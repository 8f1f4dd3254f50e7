"""`lorafleet validate PATH... [--train-config CONFIG.yaml]`: cluster launcher YAMLs through
Ray's own validator (the one `ray up` runs), KubeRay RayJob manifests against the shape the
operator needs, and in both that the nodes install lorafleet; with a run config, that its
actors' resource asks fit the file's node types (each role's bundle on some node type, the
total on the cluster at its largest, as the run's placement checks it at start)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .actor_group import GroupSpec, shortfalls


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


def node_types(doc: dict) -> dict[str, tuple[dict[str, float], int]]:
    """Node type -> (the Ray resources of one node, the most such nodes the cluster has).
    Launcher files: each type's `resources`; RayJobs: each group's container limits."""
    if doc.get("kind") == "RayJob":
        cluster = doc["spec"]["rayClusterSpec"]
        groups = [("head", cluster["headGroupSpec"], 1)] + [
            (g["groupName"], g, g.get("maxReplicas", g.get("replicas", 1)))
            for g in cluster.get("workerGroupSpecs", [])]
        return {name: (pod_resources(group), count) for name, group, count in groups}
    types = doc.get("available_node_types", {})
    head = doc.get("head_node_type")
    return {name: ({k: float(v) for k, v in (spec.get("resources") or {}).items()},
                   1 if name == head else spec.get("max_workers", 0))
            for name, spec in types.items()}


def pod_resources(group: dict) -> dict[str, float]:
    """A KubeRay group's Ray resources: its first container's CPU and nvidia.com/gpu limits."""
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpu = str(limits.get("cpu", 0))
    resources = {"CPU": float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)}
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = float(limits["nvidia.com/gpu"])
    return resources


def fit_problems(doc: dict, specs: list[GroupSpec], strategy: str) -> list[str] | None:
    """What the cluster's node types cannot hold of the run's actors (empty: it fits; None:
    the file cannot say: the local provider's machines report their own resources)."""
    if doc.get("provider", {}).get("type") == "local":
        return None
    types = node_types(doc)
    undeclared = [name for name, (resources, _) in types.items() if not resources]
    if not types or undeclared:
        return [f"node types {undeclared or '(none)'} declare no resources: write each one's "
                "`resources: {CPU: n, GPU: m}` so the run's asks can be checked"]
    problems = []
    for spec in specs:
        bundle = spec.resources.bundle()
        if spec.size and not [name for name, (resources, _) in types.items()
                              if all(resources.get(k, 0) >= v for k, v in bundle.items())]:
            offers = "; ".join(f"{name}: {resources}" for name, (resources, _) in types.items())
            problems.append(f"no node type holds a {spec.role} actor's {bundle} "
                            f"({', '.join(spec.resource_keys[k] for k in bundle)}); node types "
                            f"offer {offers}")
    nodes = [resources for resources, count in types.values() for _ in range(count)]
    return problems or shortfalls(specs, nodes, strategy)


def validate(paths: list[str], train_config: str | None = None) -> bool:
    """Print a verdict per file; True when all are valid (and hold the run config's actors)."""
    specs, strategy = None, "PACK"
    if train_config is not None:
        from .config import load_train_config
        from .specs import group_specs

        cfg = load_train_config(train_config)
        specs, strategy = group_specs(cfg), cfg.placement.strategy
    ok = True
    for name in paths:
        problems = validate_file(Path(name))
        fit = None
        if not problems and specs is not None:
            fit = fit_problems(yaml.safe_load(Path(name).read_text()), specs, strategy)
            problems = [f"{train_config}: {p}" for p in fit or []]
        ok &= not problems
        verdict = "INVALID" if problems else f"ok, holds {train_config}" if fit == [] else "ok"
        print(f"{name}: {verdict}")
        for problem in problems:
            print(f"  - {problem}")
        if specs is not None and fit is None and not problems:
            print(f"  - {train_config} not checked: the local provider's machines report their "
                  "own resources when Ray starts on them")
    return ok
