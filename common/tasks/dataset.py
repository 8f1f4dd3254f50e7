"""A user's own prompts (`task.name=dataset`): RL and held-out evaluation draw from a prompt
dataset (`task.data`), and every other column of a row travels with its prompt to the reward
functions (TRL's contract, `reward/registry.py`).

`prompt_column` holds a string or a conversation (a list of {role, content} messages, rendered
with the tokenizer's chat template when tokenised: `common/data.py: render_prompt`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from ..configio import ConfigError
from ..corpora import TASK_SOURCE, DatasetConfig, LoadedDataset, RowChecker, load_rows, read_source
from ..data import split_held_out
from .base import ModelRecipe, Task, TaskExample, check_split

ROLES = ("system", "user", "assistant", "tool")
# the DatasetConfig keys a prompt dataset reads; the others belong to the offline stages
PROMPT_KEYS = ("path", "name", "split", "prompt_column", "skip_bad_rows", "max_rows")


@dataclass
class PromptDataConfig:
    """task.name=dataset: where the prompts come from. `train` is a dataset section like
    sft.data (a local .jsonl/.json/.parquet/.csv/.tsv or a hub name, with split, name,
    max_rows, skip_bad_rows, prompt_column); `eval` another, or None: a seeded `eval_fraction`
    of train is held out (seeded by task.seed)."""

    train: DatasetConfig = field(default_factory=DatasetConfig)
    eval: DatasetConfig | None = None
    eval_fraction: float = 0.1
    system_prompt: str | None = None  # prepended to every prompt as a system message

    def validate(self) -> None:
        for key, section in (("train", self.train), ("eval", self.eval)):
            if section is None or (section is self.train and self == PromptDataConfig()):
                continue  # the default: unused (task.name is not dataset)
            if section.path == TASK_SOURCE:
                raise ConfigError(f"task.data.{key}.path: give a prompt file (.jsonl, .json, "
                                  ".parquet, .csv, .tsv) or a hub dataset name")
            ignored = [f.name for f in fields(DatasetConfig) if f.name not in PROMPT_KEYS
                       and getattr(section, f.name) != getattr(DatasetConfig(), f.name)]
            if ignored:
                raise ConfigError(f"task.data.{key}: {ignored} are keys of the offline stages' "
                                  f"datasets; a prompt dataset reads {list(PROMPT_KEYS)}")
        if self.eval is None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"task.data.eval_fraction must be in (0, 1), got "
                              f"{self.eval_fraction}")


def conversation(checker: RowChecker, i: int, column: str, value: object) -> list | None:
    """`value` as a checked message list, or None (a bad row, skipped or raised)."""
    if not value:
        return checker.bad(i, f"column {column!r} is an empty conversation")
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return checker.bad(i, f"column {column!r}: message {k} is not a {{role, content}} "
                                  f"object with text content: {message!r}")
        if message.get("role") not in ROLES:
            return checker.bad(i, f"column {column!r}: message {k} has unknown role "
                                  f"{message.get('role')!r} (allowed: {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


class DatasetTask(Task):
    """Prompts and columns of a user's dataset; no gold answers, so no SFT/DPO rows from it
    (give those stages their own data) and no embedded model (set model.name_or_path)."""

    def __init__(self, data: PromptDataConfig, seed: int) -> None:
        self.data = data
        self.train = self.load(data.train)
        if data.eval is not None:
            self.held_out = self.load(data.eval)
        else:
            items, held_out = split_held_out(self.train.items, data.eval_fraction, seed)
            self.train = LoadedDataset(items, self.train.skipped, self.train.source)
            self.held_out = LoadedDataset(held_out, {}, f"{data.eval_fraction:.0%} of "
                                          f"{self.train.source}")

    def load(self, cfg: DatasetConfig) -> LoadedDataset:
        system = self.data.system_prompt

        def build(checker: RowChecker, i: int, row: dict) -> TaskExample | None:
            if not isinstance(row, dict) or cfg.prompt_column not in row:
                return checker.text(row, i, cfg.prompt_column)  # names the missing column
            value = row[cfg.prompt_column]
            columns = {k: v for k, v in row.items() if k != cfg.prompt_column}
            if isinstance(value, list):
                messages = conversation(checker, i, cfg.prompt_column, value)
                if messages is None:
                    return None
                text = messages[-1]["content"]
            elif isinstance(value, str):
                text = checker.text(row, i, cfg.prompt_column)
                if text is None:
                    return None
                messages = None if system is None else [{"role": "user", "content": text}]
            else:
                return checker.bad(i, f"column {cfg.prompt_column!r} is neither text nor a "
                                      f"list of messages: {type(value).__name__}")
            if system is not None:
                messages = [{"role": "system", "content": system}, *messages]
            return TaskExample(text, "", conversation=messages, columns=columns)

        return load_rows(cfg, read_source(cfg), build)

    def examples(self, split: str) -> list[TaskExample]:
        check_split(split)
        return (self.train if split == "train" else self.held_out).items

    @property
    def model_recipe(self) -> ModelRecipe:
        raise ConfigError("task.name=dataset has no embedded model: set model.name_or_path to "
                          "a model directory or hub name")

    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        raise ConfigError("task.name=dataset has no gold answers to make preference pairs "
                          "from: give the dpo/rm stage its own data (dpo.data.path=...)")
