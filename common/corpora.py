"""Offline datasets for the SFT, DPO and MEET stages: prompt/response rows (MEET's with a
quality level) and preference pairs.

Sources: `task` (the run's task: its examples with their gold answers, its `preference_rows`
or its `scored_rows`), a local file (.jsonl, .json, .parquet, .csv, .tsv), or a Hugging Face hub
dataset name (read with `datasets.load_dataset`, needs network). Rows are checked before any
actor starts; a bad row is an error naming the source, row and column, or is skipped and
counted when `skip_bad_rows` is set.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from .records import PreferencePair, SFTExample
from .tasks.base import Task, sft_rows

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
    # preference rows in a published layout, mapped to prompt/chosen/rejected (README):
    # "hh-rlhf" (Anthropic/hh-rlhf: two whole dialogues; the prompt is the shared part up to
    # the last "Assistant:"), "summarize-from-feedback" (openai/summarize_from_feedback,
    # config "comparisons": info.post + summaries[choice] vs the other summary)
    row_format: Literal["columns", "hh-rlhf", "summarize-from-feedback"] = "columns"
    margin_column: str | None = None  # reward model: per-pair score gap asked for (>= 0)
    tie_column: str | None = None  # reward model: true when neither response is preferred
    # path=task preference pairs: the rejected answer is the teacher's "near_miss" (off by 1
    # or 10) or a "random" wrong sum (the addition task only)
    task_rejected: Literal["near_miss", "random"] = "near_miss"
    skip_bad_rows: bool = False  # False: the first bad row is an error; True: skip and count
    max_rows: int | None = None


def read_rows(cfg: DatasetConfig, task: Task, kind: str) -> list[dict]:
    """The raw rows of a source as dicts (`kind` is "sft", "scored" or "preference" for task
    data)."""
    if cfg.path == TASK_SOURCE:
        if kind == "sft":
            return sft_rows(task.examples(cfg.split))
        if kind == "scored":
            return task.scored_rows(cfg.split)
        return task.preference_rows(cfg.split, rejected=cfg.task_rejected)
    return read_source(cfg)


def read_source(cfg: DatasetConfig) -> list[dict]:
    """The raw rows of a local file or a hub dataset."""
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


def sft_builder(cfg: DatasetConfig, tokenizer, max_tokens: int):
    """`build(checker, index, row)`: a row's tokenised SFTExample, or None to skip it."""

    def build(checker: RowChecker, i: int, row: dict) -> SFTExample | None:
        prompt = checker.text(row, i, cfg.prompt_column)
        response = prompt and checker.text(row, i, cfg.response_column)
        if not response:
            return None
        prompt_ids, response_ids = encode(tokenizer, prompt, response)
        if not fits(checker, i, len(prompt_ids) + len(response_ids), max_tokens):
            return None
        return SFTExample(i, prompt_ids, response_ids)

    return build


def load_sft(
    cfg: DatasetConfig, task: Task, tokenizer, max_tokens: int
) -> LoadedDataset:
    return load_rows(cfg, read_rows(cfg, task, "sft"), sft_builder(cfg, tokenizer, max_tokens))


def level_of(score: float, bins: list[float]) -> int:
    """The quality level of a score: how many of the increasing bin edges are <= it."""
    return bisect.bisect_right(bins, score)


def load_leveled(
    cfg: DatasetConfig, level_column: str | None, score_column: str | None, bins: list[float],
    task: Task, tokenizer, max_tokens: int, control_texts: list[str] = (),
) -> LoadedDataset:
    """Prompt/response rows with a quality level: an integer `level_column` (0 = worst), or
    `score_column` binned by `bins` (K = len(bins) + 1 levels), each prompt led by its level's
    control text if any are given. Every level must have rows."""

    def level(checker: RowChecker, i: int, row: dict) -> int | None:
        column = level_column or score_column
        value = row.get(column)
        if isinstance(value, str):  # CSV/TSV give strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            return checker.bad(i, f"column {column!r} is not a finite number: {value!r}")
        if score_column is not None:
            return level_of(value, bins)
        if value < 0 or value != int(value):
            return checker.bad(i, f"column {column!r} is not a level 0, 1, ...: {value!r}")
        return int(value)

    def build(checker: RowChecker, i: int, row: dict) -> SFTExample | None:
        row_level = level(checker, i, row)
        if row_level is None:
            return None
        if control_texts:  # Chain of Hindsight: the level's text leads the prompt
            if row_level >= len(control_texts):
                return checker.bad(i, f"level {row_level} has no control text (meet."
                                      f"control_texts has {len(control_texts)})")
            prompt = checker.text(row, i, cfg.prompt_column)
            row = prompt and {**row, cfg.prompt_column: f"{control_texts[row_level]} {prompt}"}
        example = row and sft(checker, i, row)
        return example and replace(example, level=row_level)

    sft = sft_builder(cfg, tokenizer, max_tokens)
    data = load_rows(cfg, read_rows(cfg, task, "scored"), build)
    counts = level_counts(data.items, len(bins) + 1 if score_column is not None else None)
    if 0 in counts:
        raise DatasetError(f"{data.source}: no rows of level {counts.index(0)} (rows per level: "
                           f"{counts}); change meet.bins or the data")
    return data


def load_paired_levels(
    cfg: DatasetConfig, task: Task, tokenizer, max_tokens: int
) -> LoadedDataset:
    """Preference rows (prompt / chosen / rejected columns, or a published layout by
    `row_format`) as two quality levels: each row's rejected response is level 0, its chosen
    one level 1, both under the row's prompt."""
    pairs = load_preferences(cfg, task, tokenizer, max_tokens)
    items = [SFTExample(pair.index, pair.prompt_ids, response, level)
             for pair in pairs.items
             for level, response in enumerate((pair.rejected_ids, pair.chosen_ids))]
    return LoadedDataset(items, pairs.skipped, pairs.source)


def level_counts(items: list[SFTExample], levels: int | None = None) -> list[int]:
    """Rows per level, for `levels` levels (None: up to the highest level present)."""
    counts = [0] * (levels or 1 + max(e.level for e in items))
    for example in items:
        counts[example.level] += 1
    return counts


def load_preferences(
    cfg: DatasetConfig, task: Task, tokenizer, max_tokens: int
) -> LoadedDataset:
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    if cfg.row_format != "columns":
        columns = ("prompt", "chosen", "rejected")

    def build(checker: RowChecker, i: int, row: dict) -> PreferencePair | None:
        if cfg.row_format != "columns":
            row = ROW_FORMATS[cfg.row_format](checker, i, row)
            if row is None:
                return None
        prompt = checker.text(row, i, columns[0])
        chosen = prompt and checker.text(row, i, columns[1])
        rejected = chosen and checker.text(row, i, columns[2])
        if not rejected:
            return None
        if chosen == rejected:
            return checker.bad(i, "identical chosen and rejected responses")
        margin = pair_margin(checker, i, row, cfg.margin_column)
        tie = pair_tie(checker, i, row, cfg.tie_column)
        if margin is None or tie is None:
            return None
        prompt_ids, chosen_ids = encode(tokenizer, prompt, chosen)
        rejected_ids = encode(tokenizer, prompt, rejected)[1]
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if not fits(checker, i, longest, max_tokens):
            return None
        return PreferencePair(i, prompt_ids, chosen_ids, rejected_ids, margin, tie)

    return load_rows(cfg, read_rows(cfg, task, "preference"), build)


def pair_margin(checker: RowChecker, i: int, row: dict, column: str | None) -> float | None:
    if column is None:
        return 0.0
    value = row.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        return checker.bad(i, f"column {column!r} is not a finite number >= 0: {value!r}")
    return float(value)


def pair_tie(checker: RowChecker, i: int, row: dict, column: str | None) -> bool | None:
    if column is None:
        return False
    value = row.get(column)
    if value not in (True, False, 0, 1, "true", "false", "0", "1"):  # CSV/TSV give strings
        return checker.bad(i, f"column {column!r} is not a boolean: {value!r}")
    return value in (True, 1, "true", "1")


ASSISTANT_TURN = "\n\nAssistant:"


def hh_rlhf_row(checker: RowChecker, i: int, row: dict) -> dict | None:
    """Anthropic HH-RLHF: `chosen` and `rejected` are whole dialogues that differ in the last
    assistant turn; the prompt is the dialogue up to and including its "Assistant:"."""
    chosen = checker.text(row, i, "chosen")
    rejected = chosen and checker.text(row, i, "rejected")
    if not rejected:
        return None
    cut = chosen.rfind(ASSISTANT_TURN)
    if cut < 0:
        return checker.bad(i, f"column 'chosen' has no {ASSISTANT_TURN!r} turn")
    prompt = chosen[: cut + len(ASSISTANT_TURN)]
    if not rejected.startswith(prompt):
        return checker.bad(i, "column 'rejected' does not share the dialogue before the last "
                              "assistant turn of 'chosen'")
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def summarize_feedback_row(checker: RowChecker, i: int, row: dict) -> dict | None:
    """openai/summarize_from_feedback "comparisons": the post (`info`) with the summary the
    labeller chose (`summaries[choice]`) against the other one; prompt in the paper's format."""
    if not isinstance(row, dict):
        return checker.bad(i, f"not an object: {type(row).__name__}")
    info, summaries, choice = row.get("info"), row.get("summaries"), row.get("choice")
    if not isinstance(info, dict) or not (info.get("post") or info.get("article")):
        return checker.bad(i, "column 'info' has no post or article")
    if not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
        return checker.bad(i, f"columns 'summaries' / 'choice' are not two summaries and 0 or "
                              f"1: {choice!r}")
    if info.get("post"):
        prompt = (f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\n"
                  f"POST: {info['post']}\n\nTL;DR:")
    else:  # CNN/DM rows carry an article instead of a post
        prompt = f"ARTICLE: {info['article']}\n\nTL;DR:"
    texts = [s.get("text") if isinstance(s, dict) else None for s in summaries]
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]}


ROW_FORMATS = {"hh-rlhf": hh_rlhf_row, "summarize-from-feedback": summarize_feedback_row}


def fits(checker: RowChecker, index: int, tokens: int, max_tokens: int) -> bool:
    if tokens <= max_tokens:
        return True
    checker.bad(index, f"too long: {tokens} tokens > model.max_model_len {max_tokens}")
    return False


def load_rows(cfg: DatasetConfig, rows: list[dict], build) -> LoadedDataset:
    """`build(checker, index, row)` turns each raw row into a record, or None to skip it."""
    checker = RowChecker(cfg.path, cfg.skip_bad_rows)
    items = []
    for i, row in enumerate(rows[: cfg.max_rows]):
        item = build(checker, i, row)
        if item is not None:
            items.append(item)
    if not items:
        raise DatasetError(f"{checker.source}: no usable rows (skipped: {checker.skipped})")
    return LoadedDataset(items, checker.skipped, checker.source)
