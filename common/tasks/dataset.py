"""A user's own prompts (`task.name=dataset`): RL and held-out evaluation draw from a prompt
dataset (`task.data`), and every other column of a row travels with its prompt to the reward
functions (TRL's contract, `reward/registry.py`).

`prompt_column` holds a string or a conversation (a list of {role, content} messages, rendered
with the tokenizer's chat template when tokenised: `common/data.py: render_prompt`).

With `model.name_or_path=tiny` the embedded model is built from the data (`DatasetModel`): a
tokenizer over its prompts and `answer` column, Qwen2's chat template (ChatML), and a warm
start on the training rows' answers from the biased teacher (`task.demo_error_rate`,
`task.demo_slip`), as for the addition task.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..configio import ConfigError
from ..corpora import TASK_SOURCE, DatasetConfig, LoadedDataset, RowChecker, load_rows, read_source
from ..data import split_held_out
from .base import ModelRecipe, Task, TaskExample, check_split, teacher_answer

ROLES = ("system", "user", "assistant", "tool")
# the DatasetConfig keys a prompt dataset reads; the others belong to the offline stages
PROMPT_KEYS = ("path", "name", "split", "prompt_column", "skip_bad_rows", "max_rows")
ANSWER_COLUMN = "answer"  # the gold answer the embedded model's warm start imitates
# Qwen2's chat format (ChatML), without Qwen's default system prompt
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
    (give those stages their own data). The embedded model (`DatasetModel`) needs an `answer`
    column; `demo_error_rate` and `demo_slip` are its teacher's."""

    def __init__(self, data: PromptDataConfig, seed: int, demo_error_rate: float = 0.7,
                 demo_slip: str = "one_high") -> None:
        self.data = data
        self.teacher = (demo_error_rate, demo_slip)
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
            return TaskExample(text, "", conversation=messages, columns=columns,
                               where=f"{checker.source}: row {i}")

        return load_rows(cfg, read_source(cfg), build)

    def examples(self, split: str) -> list[TaskExample]:
        check_split(split)
        return (self.train if split == "train" else self.held_out).items

    @property
    def model_recipe(self) -> ModelRecipe:
        return DatasetModel(self)

    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        raise ConfigError("task.name=dataset has no gold answers to make preference pairs "
                          "from: give the dpo/rm stage its own data (dpo.data.path=...)")


class DatasetModel(ModelRecipe):
    """The embedded model of a prompt dataset with integer answers in its `answer` column
    (`lorafleet make-data word-problems`): ChatML, a tokenizer over every prompt and answer,
    and a warm start on the training prompts with the teacher's answers. The recipe covers
    the rows themselves, so other data builds another model."""

    chat_template = CHATML
    chat_tokens = ("<|im_start|>", "<|im_end|>")

    def __init__(self, task: DatasetTask) -> None:
        self.task = task

    def recipe(self) -> dict:
        rows = [(ex.conversation or ex.prompt, ex.columns) for split in ("train", "eval")
                for ex in self.task.examples(split)]
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode())
        error_rate, slip = self.task.teacher
        return {"name": Path(self.task.data.train.path).stem, "rows": digest.hexdigest(),
                "chat_template": CHATML, "demo_error_rate": error_rate, "demo_slip": slip}

    def tokenizer_corpus(self) -> Iterator[str]:
        for split in ("train", "eval"):
            for ex in self.task.examples(split):
                for message in ex.conversation or [{"role": "user", "content": ex.prompt}]:
                    yield f"{message['role']}\n{message['content']}"
                yield f"assistant\n{ex.columns.get(ANSWER_COLUMN, '')}"

    def warm_start_examples(self) -> list[TaskExample]:
        """The training prompts with their `answer` column as the gold answer."""
        examples = []
        for ex in self.task.examples("train"):
            answer = str(ex.columns.get(ANSWER_COLUMN, "")).strip()
            if not answer.lstrip("-").isdigit():
                raise ConfigError(
                    f"model.name_or_path=tiny on task.name=dataset warm-starts on an integer "
                    f"{ANSWER_COLUMN!r} column; {self.task.train.source} has prompt "
                    f"{ex.prompt[:60]!r} with {ANSWER_COLUMN}={answer!r}: give such a column "
                    "or a model (model.name_or_path)")
            examples.append(replace(ex, answer=answer))
        return examples

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        return teacher_answer(example.answer, rng, *self.task.teacher)
