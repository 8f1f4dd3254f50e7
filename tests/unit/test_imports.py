"""The import graph of the package: no cycles (function-level imports included) and each role
imports only the roles below it, so a reader can take one folder at a time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ROLES = ("common", "rollout", "reward", "learner", "cluster")
# What each role may import besides itself. common is the shared floor; the reward actors run
# the learner's model code for a learned reward model (learner.model, learner.reward_model).
ALLOWED = {
    "common": set(),
    "rollout": {"common"},
    "learner": {"common"},
    "reward": {"common", "learner"},
    "cluster": {"common", "rollout", "reward", "learner"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["lorafleet", *parts])


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for role in ROLES for p in (ROOT / role).rglob("*.py")}


def imported_modules(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The package modules `path` imports anywhere in its body (module level, functions,
    TYPE_CHECKING blocks), resolved to the most specific known module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = package_modules()
    graph = {name: imported_modules(path, name, known) for name, path in known.items()}
    # `from .x import y` names the package `x` lives in as well; a package importing its own
    # submodule is how packages are built, not a cycle.
    return {name: {t for t in targets if not name.startswith(f"{t}.")}
            for name, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def role(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # cluster/cli.py imports the trainer inside cmd_train only
    assert "lorafleet.cluster.trainer" in graph["lorafleet.cluster.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", ROLES)
def test_roles_import_only_the_roles_below(layer):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items() if role(module) == layer
        for target in targets if role(target) not in ALLOWED[layer] | {layer}
    )
    assert not wrong, "\n".join(wrong)
