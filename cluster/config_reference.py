"""The configuration reference, docs/configuration.md, generated from the config dataclasses:
one table per section (key, type, default, description). A key's description is the comment
written beside it in its class: the comment lines right above the field and the comment at
the end of its line. `lorafleet config-reference` writes the page, `--check` only compares.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path

import yaml

from ..common.config import TINY
from ..learner.algorithms.registry import ALGORITHMS, AlgoConfig
from .config import TrainConfig
from .policies import MAX_NAME_LENGTH, PER_POLICY_KEYS, TINY_TASK_KEYS
from .tinker.config import SERVED_ROLLOUT_KEYS, ServeConfig, ServeSection

DEFAULT_PATH = Path("docs/configuration.md")
COMMAND = "lorafleet config-reference"
INTRO = f"""\
# Configuration reference

A run is configured by one YAML file and `key=value` overrides on the command line (dotted
keys, values parsed as YAML); every key has a default, and the defaults run the default job:

```bash
lorafleet train deploy/configs/default.yaml rollout.num_workers=1 algo.kl_coef=0.05 \\
  run_dir=runs/kl05
```

Unknown keys and wrong types are errors that name the key and list what is allowed. So are,
before Ray starts, a `model.name_or_path` that is neither a directory with a `config.json` nor
a hub name found in the local cache or on the hub, and a `reward.fns` entry that is neither
registered nor an importable `package.module:function` (or, for `task.name=dataset`, does not
fit the data's columns: see [tasks and data](tasks-and-data.md)). The resolved configuration,
every key included, is written to the run directory's `config.yaml`.

This page is generated from the config dataclasses by `{COMMAND}` (a unit test
fails when it is out of date); a key's description is the comment beside it in the code.
"""


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field of `cls`'s own body with its comment: the comment lines right above the
    field and the comment at the end of its line(s), joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    described = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        described[node.target.id] = "; ".join(part for part in (" ".join(above), *beside)
                                              if part)
    return described


def description(cls: type, name: str) -> str:
    """The comment of field `name` in the nearest class of `cls`'s MRO that comments it."""
    for klass in cls.__mro__:
        if is_dataclass(klass) and name in klass.__dict__.get("__annotations__", {}):
            text = field_comments(klass).get(name, "")
            if text:
                return text
    return ""


def section_type(cls: type, name: str) -> type | None:
    """The config dataclass a field holds (a `X | None` section included), or None."""
    hint = typing.get_type_hints(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def default_of(f: Field) -> object:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code(value: object) -> str:
    """A value as it is written in YAML, in a table cell."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return f"`{cell(text.removesuffix('...').strip())}`"


def type_name(f: Field) -> str:
    """The field's annotation, Literal[...] written as its values."""
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: " | ".join(m[1].split(", ")), str(f.type))
    return f"`{cell(text)}`"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def sections(cls: type, path: str) -> list[tuple[str, type]]:
    """(key path, class) of `cls`'s nested sections, depth first (the `algo` section, whose
    class `algo.name` picks, as AlgoConfig)."""
    found = []
    for f in fields(cls):
        nested = section_type(cls, f.name)
        if nested is not None:
            key = f"{path}.{f.name}" if path else f.name
            found.append((key, nested))
            if nested is not AlgoConfig:
                found += sections(nested, key)
    return found


def table(cls: type, path: str, names: list[str], links: dict[type, str]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    by_name = {f.name: f for f in fields(cls)}
    for name in names:
        f = by_name[name]
        text = cell(description(cls, name))
        nested = section_type(cls, name)
        if nested is AlgoConfig:
            rows.append(f"| `{name}` | section |  | see [`algo`](#algo), by `algo.name` |")
        elif nested is not None:
            key = f"{path}.{name}" if path else name
            target = links.get(nested, key)
            default = "" if default_of(f) is not None else code(None)
            see = f"see [`{target}`](#{anchor(target)})"
            rows.append(f"| `{name}` | section | {default} | {f'{text}; {see}' if text else see} |")
        else:
            rows.append(f"| `{name}` | {type_name(f)} | {code(default_of(f))} | {text} |")
    return rows


def class_doc(cls: type) -> list[str]:
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):  # the dataclass's generated signature
        return []
    return [" ".join(inspect.cleandoc(doc).split()), ""]


def algo_sections(links: dict[type, str]) -> list[str]:
    common = [f.name for f in fields(AlgoConfig)]
    out = ["## `algo`", "", *class_doc(AlgoConfig),
           "The keys every algorithm reads:", "", *table(AlgoConfig, "algo", common, links), ""]
    for algo in ALGORITHMS.values():
        own = [f.name for f in fields(algo.config) if f.name not in common]
        out += [f"### `algo.name: {algo.name}`", "", *class_doc(algo.config)]
        if own:
            out += ["Its keys besides the common ones:", "",
                    *table(algo.config, "algo", own, links), ""]
        else:
            out += ["No keys besides the common ones.", ""]
    return out


def policies_section() -> list[str]:
    """The `policies` entries: what a policy may set (PER_POLICY_KEYS) and how it is named."""
    keys = ", ".join(f"`{key}`" if "." in key or not section_type(TrainConfig, key)
                     else f"`{key}.*`" for key in PER_POLICY_KEYS)
    tiny = ", ".join(f"`task.{key}`" for key in TINY_TASK_KEYS)
    text = f"""\
Several policies trained at once in the `rl` stage on one base model and one fleet: every
rollout engine serves all of them (at most `rollout.max_loras`), the learner holds one adapter
set per policy. An entry is a `name` and overrides of the top level for that policy, as nested
mappings or dotted keys; each policy writes to `RUN_DIR/<name>/` what a single run writes to
`RUN_DIR`. A name is letters, digits and `_=+-`, starting with a letter or digit, at most
{MAX_NAME_LENGTH} characters, and unique; any such name is the user's (the learner names its
adapters itself: `a`, `value` or `default` are policy names like any other).

The keys a policy may set (`.*`: every key of the section):

{keys}

Every other key is shared by all the policies (the base model, the tokenizer, the fleet's
sizes and resources, the iterations, ...): setting it in a policy is an error naming the
policy and the key. With `model.name_or_path: {TINY}` the base model is built from the task,
so of the `task` keys only {tiny} may differ between policies. A policy that picks another
`algo.name` (or `task.name`) keeps the top level's keys of that section that the new one reads
and that differ from the old one's defaults.

```yaml
policies:
  - {{name: seed1, seed: 1}}
  - {{name: lr3e-4, seed: 2, algo: {{policy_lr: 3.0e-4}}, reward.fns: [exact_match]}}
```

`lorafleet sweep CONFIG algo.policy_lr=1e-4,3e-4 seed=0,1` writes such entries for you: one
policy per combination of the listed values, named like `policy_lr=1e-4_seed=0`.
"""
    return ["## `policies`", "", text]


def serve_sections(links: dict[type, str]) -> list[str]:
    """`lorafleet serve`'s config: its own top-level keys and `serve` section; the fleet's
    sections are the run's."""
    shared = ", ".join(f"`{f.name}`" for f in fields(ServeConfig) if section_type(
        ServeConfig, f.name) not in (None, ServeSection))
    served = ", ".join(f"`{key}`" for key in SERVED_ROLLOUT_KEYS)
    text = f"""\
`lorafleet serve CONFIG key=value ...` (the Tinker API, [docs/tinker.md](tinker.md)) reads its
own file. It has the sections {shared} as a run has them above, of `rollout` only {served}
(its clients choose how to sample: another `rollout` key is an error), and the keys below."""
    top = [f.name for f in fields(ServeConfig) if section_type(ServeConfig, f.name) is None]
    names = [f.name for f in fields(ServeSection)]
    return ["## `lorafleet serve`", "", text, "",
            *table(ServeConfig, "", top, links), "", "### `serve`", "",
            *table(ServeSection, "serve", names, links), ""]


def render() -> str:
    """docs/configuration.md as the dataclasses describe it now."""
    nested = sections(TrainConfig, "")
    paths: dict[type, list[str]] = {}
    for key, cls in nested:
        paths.setdefault(cls, []).append(key)
    shared = {cls: cls.__name__ for cls, keys in paths.items() if len(keys) > 1}
    out = [INTRO, "## Top level", "", *class_doc(TrainConfig),
           *table(TrainConfig, "", [f.name for f in fields(TrainConfig)], shared), ""]
    for key, cls in nested:
        if cls is AlgoConfig:
            out += algo_sections(shared)
        if cls in shared or cls is AlgoConfig:
            continue
        out += [f"## `{key}`", "", *class_doc(cls),
                *table(cls, key, [f.name for f in fields(cls)], shared), ""]
    out += policies_section()
    out += serve_sections(shared)
    for cls, name in shared.items():
        where = ", ".join(f"`{key}`" for key in paths[cls])
        out += [f"## {name}", "", f"A dataset section, at {where}.", "", *class_doc(cls),
                *table(cls, name, [f.name for f in fields(cls)], shared), ""]
    return "\n".join(out).rstrip() + "\n"


def write_reference(path: Path = DEFAULT_PATH, check: bool = False) -> bool:
    """Write the reference to `path`, or with `check` only compare; True when it was current."""
    text = render()
    current = path.is_file() and path.read_text() == text
    if not check and not current:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return current
