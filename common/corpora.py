"""Offline datasets for the SFT and DPO stages: prompt/response rows and preference pairs.

Sources: `task` (generated from the run's task, see `TaskConfig.sft_rows` /
`preference_rows`), a local file (.jsonl, .json, .parquet, .csv, .tsv), or a Hugging Face hub
dataset name (read with `datasets.load_dataset`, needs network). Rows are checked before any
actor starts; a bad row is an error naming the source, row and column, or is skipped and
counted when `skip_bad_rows` is set.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .records import PreferencePair, SFTExample
from .tasks import TaskConfig

TASK_SOURCE = "task"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")


class DatasetError(ValueError):
    """A dataset that cannot be used, naming the source and, where it applies, row and column."""


@dataclass
class DatasetConfig:
    path: str = TASK_SOURCE  # "task", a local file, or a HF hub dataset name
    name: str | None = None  # hub dataset configuration (e.g. "sst2" of "glue")
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str = "response"  # sft
    chosen_column: str = "chosen"  # preference pairs
    rejected_column: str = "rejected"
    skip_bad_rows: bool = False  # False: the first bad row is an error; True: skip and count
    max_rows: int | None = None


def read_rows(cfg: DatasetConfig, task: TaskConfig, kind: str) -> list[dict]:
    """The raw rows of a source as dicts (`kind` is "sft" or "preference" for task data)."""
    if cfg.path == TASK_SOURCE:
        return task.sft_rows(cfg.split) if kind == "sft" else task.preference_rows(cfg.split)
    path = Path(cfg.path)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist")
        return read_file(path)
    from datasets import load_dataset

    try:
        return list(load_dataset(cfg.path, cfg.name, split=cfg.split))
    except Exception as exc:  # hub errors come in many types; name the source either way
        raise DatasetError(
            f"cannot load dataset {cfg.path!r} ({cfg.name}, {cfg.split}): {exc}"
        ) from exc


def read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from exc
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    text = path.read_text()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {line_no} is not valid JSON: {exc}") from exc
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class RowChecker:
    """Applies the bad-row policy: raise with the row's location, or skip and count."""

    def __init__(self, source: str, skip: bool) -> None:
        self.source = source
        self.skip = skip
        self.skipped: dict[str, int] = {}

    def text(self, row: object, index: int, column: str) -> str | None:
        """The non-empty string in `column`, or None if the row is to be skipped."""
        if not isinstance(row, dict) or column not in row:
            columns = sorted(row) if isinstance(row, dict) else type(row).__name__
            return self.bad(index, f"missing column {column!r} (has {columns})")
        value = row[column]
        if not isinstance(value, str) or not value.strip():
            return self.bad(index, f"column {column!r} is empty or not text: {value!r}")
        return value

    def bad(self, index: int, problem: str) -> None:
        if not self.skip:
            raise DatasetError(f"{self.source}: row {index}: {problem}")
        reason = problem.split(":")[0].split(" (")[0]
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return None


@dataclass
class LoadedDataset:
    items: list  # SFTExample or PreferencePair records
    skipped: dict[str, int]  # reason -> rows skipped for it
    source: str

    def describe(self) -> str:
        skipped = sum(self.skipped.values())
        detail = f", skipped {skipped} bad rows {self.skipped}" if skipped else ""
        return f"{len(self.items)} rows from {self.source}{detail}"


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt with the model's special tokens; response as generated: its tokens + EOS."""
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids, response_ids + [tokenizer.eos_token_id]


def load_sft(
    cfg: DatasetConfig, task: TaskConfig, tokenizer, max_tokens: int
) -> LoadedDataset:
    def build(checker: RowChecker, i: int, row: dict) -> SFTExample | None:
        prompt = checker.text(row, i, cfg.prompt_column)
        response = prompt and checker.text(row, i, cfg.response_column)
        if not response:
            return None
        prompt_ids, response_ids = encode(tokenizer, prompt, response)
        if not fits(checker, i, len(prompt_ids) + len(response_ids), max_tokens):
            return None
        return SFTExample(i, prompt_ids, response_ids)

    return load_rows(cfg, task, "sft", build)


def load_preferences(
    cfg: DatasetConfig, task: TaskConfig, tokenizer, max_tokens: int
) -> LoadedDataset:
    def build(checker: RowChecker, i: int, row: dict) -> PreferencePair | None:
        prompt = checker.text(row, i, cfg.prompt_column)
        chosen = prompt and checker.text(row, i, cfg.chosen_column)
        rejected = chosen and checker.text(row, i, cfg.rejected_column)
        if not rejected:
            return None
        if chosen == rejected:
            return checker.bad(i, "identical chosen and rejected responses")
        prompt_ids, chosen_ids = encode(tokenizer, prompt, chosen)
        rejected_ids = encode(tokenizer, prompt, rejected)[1]
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if not fits(checker, i, longest, max_tokens):
            return None
        return PreferencePair(i, prompt_ids, chosen_ids, rejected_ids)

    return load_rows(cfg, task, "preference", build)


def fits(checker: RowChecker, index: int, tokens: int, max_tokens: int) -> bool:
    if tokens <= max_tokens:
        return True
    checker.bad(index, f"too long: {tokens} tokens > model.max_model_len {max_tokens}")
    return False


def load_rows(cfg: DatasetConfig, task: TaskConfig, kind: str, build) -> LoadedDataset:
    """`build(checker, index, row)` turns each raw row into a record, or None to skip it."""
    checker = RowChecker(cfg.path, cfg.skip_bad_rows)
    items = []
    for i, row in enumerate(read_rows(cfg, task, kind)[: cfg.max_rows]):
        item = build(checker, i, row)
        if item is not None:
            items.append(item)
    if not items:
        raise DatasetError(f"{checker.source}: no usable rows (skipped: {checker.skipped})")
    return LoadedDataset(items, checker.skipped, checker.source)
