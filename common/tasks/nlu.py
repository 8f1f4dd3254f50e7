"""NLU as generation: GLUE / SuperGLUE tasks as a prompt template + label words + the task's
official metric, their data (the Hugging Face hub, or local files in the official layouts),
and the answer parsing that the metrics and `reward/nlu.py` share.

A generated answer maps to a label when its first word is one of the task's label words
(case-insensitive, punctuation stripped); anything else is an *invalid answer*.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..corpora import DatasetError, RowChecker, read_file
from .base import ModelRecipe, Task, TaskExample, check_split
from .nlu_metrics import INVALID, METRICS

LOCAL_SUFFIXES = (".tsv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class NLUSpec:
    """One task. Columns are the hub's names; `aliases` maps the official distribution's file
    columns onto them (GLUE's TSVs name some columns differently)."""

    name: str
    benchmark: str  # the hub dataset (nyu-mll/glue, aps/super_glue); `config` its configuration
    config: str
    template: str  # str.format over the text columns
    columns: tuple[str, ...]
    labels: tuple[str, ...]  # the label words the model answers with, by label id
    label_names: tuple[str, ...]  # the label strings files may hold instead of ids, by id
    metrics: tuple[str, ...]
    eval_split: str = "validation"  # hub split used as held-out ("test" has no labels)
    local_dir: str = ""  # folder of the official distribution, e.g. "SST-2"
    local_eval: str = "dev"  # its held-out file name (GLUE: dev, SuperGLUE: val)
    aliases: dict[str, str] = field(default_factory=dict)
    tsv_fields: tuple[str, ...] | None = None  # header-less TSV (CoLA)

    def hub_name(self, split: str) -> str:
        return f"{self.benchmark}/{self.config} [{self.hub_split(split)}]"

    def hub_split(self, split: str) -> str:
        return "train" if split == "train" else self.eval_split


YES_NO = ("no", "yes")
ENTAIL = ("entailment", "not_entailment")
PAIR = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"


def _glue(name, config, template, columns, labels, label_names, metrics, local_dir, **kw):
    return NLUSpec(name, "nyu-mll/glue", config, template, columns, labels, label_names, metrics,
                   local_dir=local_dir, **kw)


def _superglue(name, template, columns, labels, label_names, metrics, local_dir):
    return NLUSpec(name, "aps/super_glue", name, template, columns, labels, label_names, metrics,
                   local_dir=local_dir, local_eval="val")


MNLI = dict(
    template="Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the "
    "hypothesis? Answer:",
    columns=("premise", "hypothesis"), labels=("yes", "maybe", "no"),
    label_names=("entailment", "neutral", "contradiction"), metrics=("accuracy",),
    local_dir="MNLI", aliases={"sentence1": "premise", "sentence2": "hypothesis",
                               "gold_label": "label"},
)

SPECS: dict[str, NLUSpec] = {s.name: s for s in [
    _glue("cola", "cola", "Sentence: {sentence}\nIs this sentence grammatical? Answer:",
          ("sentence",), YES_NO, ("unacceptable", "acceptable"), ("mcc", "accuracy"), "CoLA",
          tsv_fields=("source", "label", "original_label", "sentence")),
    _glue("sst2", "sst2", "Review: {sentence}\nSentiment:", ("sentence",),
          ("negative", "positive"), ("negative", "positive"), ("accuracy",), "SST-2"),
    _glue("mrpc", "mrpc", PAIR + "Do they mean the same? Answer:", ("sentence1", "sentence2"),
          YES_NO, ("not_equivalent", "equivalent"), ("accuracy", "f1"), "MRPC",
          aliases={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}),
    _glue("qqp", "qqp", "Question 1: {question1}\nQuestion 2: {question2}\nDo they ask the "
          "same thing? Answer:", ("question1", "question2"), YES_NO,
          ("not_duplicate", "duplicate"), ("accuracy", "f1"), "QQP",
          aliases={"is_duplicate": "label"}),
    _glue("mnli", "mnli", eval_split="validation_matched", local_eval="dev_matched", **MNLI),
    _glue("mnli_mismatched", "mnli", eval_split="validation_mismatched",
          local_eval="dev_mismatched", **MNLI),
    _glue("qnli", "qnli", "Question: {question}\nSentence: {sentence}\nDoes the sentence answer "
          "the question? Answer:", ("question", "sentence"), ("yes", "no"), ENTAIL,
          ("accuracy",), "QNLI"),
    _glue("rte", "rte", PAIR + "Does sentence 1 entail sentence 2? Answer:",
          ("sentence1", "sentence2"), ("yes", "no"), ENTAIL, ("accuracy",), "RTE"),
    _superglue("boolq", "Passage: {passage}\nQuestion: {question}?\nAnswer:",
               ("passage", "question"), YES_NO, ("false", "true"), ("accuracy",), "BoolQ"),
    _superglue("cb", "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail "
               "the hypothesis? Answer:", ("premise", "hypothesis"), ("yes", "no", "maybe"),
               ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1"), "CB"),
    _superglue("copa", "Premise: {premise}\nWhat was the {question}?\nOption 1: {choice1}\n"
               "Option 2: {choice2}\nAnswer:", ("premise", "question", "choice1", "choice2"),
               ("1", "2"), ("choice1", "choice2"), ("accuracy",), "COPA"),
    _superglue("wic", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nIs '{word}' used in "
               "the same sense in both? Answer:", ("word", "sentence1", "sentence2"), YES_NO,
               ("false", "true"), ("accuracy",), "WiC"),
]}


def get_spec(name: str) -> NLUSpec:
    if name not in SPECS:
        raise ValueError(f"unknown NLU task {name!r}; allowed: {', '.join(SPECS)}")
    return SPECS[name]


# -- answers and references ---------------------------------------------------------------------
def parse_answer(response: str, labels: tuple[str, ...] | list[str]) -> int:
    """The label id whose word the response starts with, or INVALID."""
    words = response.strip().split()
    first = words[0].strip(".,;:!?\"'").lower() if words else ""
    return labels.index(first) if first in labels else INVALID


def make_reference(task: str, gold: int, labels: tuple[str, ...], invalid_reward: float) -> str:
    """What the reward reads beside the response: task, gold id, label words, invalid reward."""
    return json.dumps({"task": task, "gold": gold, "labels": list(labels),
                       "invalid_reward": invalid_reward})


def answer_metrics(
    pairs: list[tuple[str, str]], specs: dict[str, NLUSpec]
) -> dict[str, float]:
    """Each task's official metrics and invalid-answer rate over (response, reference) pairs,
    keyed `task/metric`."""
    by_task: dict[str, tuple[list[int], list[int], int]] = {}
    for response, reference in pairs:
        ref = json.loads(reference)
        gold, pred, _ = by_task.setdefault(ref["task"], ([], [], len(ref["labels"])))
        gold.append(ref["gold"])
        pred.append(parse_answer(response, ref["labels"]))
    out = {}
    for task, (gold, pred, n_labels) in sorted(by_task.items()):
        for metric in specs[task].metrics:
            out[f"{task}/{metric}"] = METRICS[metric](gold, pred, n_labels)
        out[f"{task}/invalid_rate"] = pred.count(INVALID) / len(pred)
    return out


# -- data ---------------------------------------------------------------------------------------
Row = tuple[dict[str, str], int]  # text columns, label id


def local_file(spec: NLUSpec, data_dir: Path, split: str) -> Path:
    stem = "train" if split == "train" else spec.local_eval
    tried = [data_dir / spec.local_dir / f"{stem}{suffix}" for suffix in LOCAL_SUFFIXES]
    for path in tried:
        if path.is_file():
            return path
    raise DatasetError(f"{spec.name}: no {split} file; looked for {', '.join(map(str, tried))}")


def read_local(spec: NLUSpec, path: Path) -> list[dict]:
    if path.suffix != ".tsv":
        return read_file(path)
    # GLUE's TSVs are not CSV-quoted (quotes are text); CoLA's have no header row.
    with path.open(newline="") as f:
        return list(csv.DictReader(f, fieldnames=spec.tsv_fields, delimiter="\t",
                                   quoting=csv.QUOTE_NONE))


def read_hub(spec: NLUSpec, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset(spec.benchmark, spec.config, split=spec.hub_split(split)))
    except Exception as exc:  # hub errors come in many types; name the source either way
        raise DatasetError(f"cannot load {spec.hub_name(split)} from the hub: {exc}") from exc


def label_id(spec: NLUSpec, value: object) -> int | None:
    """A label as the hub (int id), GLUE TSVs (id or name as text) or SuperGLUE JSONL
    (bool or name) spell it; None if it is none of the task's labels."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in spec.label_names:
            return spec.label_names.index(text.lower())
        value = int(text) if text.lstrip("-").isdigit() else None
    if isinstance(value, int) and 0 <= value < len(spec.labels):
        return value
    return None


def check_rows(spec: NLUSpec, raw: list[dict], source: str, skip: bool) -> list[Row]:
    """Text columns and label id of each row; a missing column or an unknown label is an
    error naming source, row and column (or, with `skip`, the row is skipped)."""
    checker = RowChecker(source, skip)
    rows = []
    for i, row in enumerate(raw):
        row = {spec.aliases.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row
        texts = {c: checker.text(row, i, c) for c in spec.columns}
        if None in texts.values():
            continue
        if "label" not in row:
            checker.bad(i, f"missing column 'label' (has {sorted(row)})")
            continue
        gold = label_id(spec, row["label"])
        if gold is None:
            allowed = list(range(len(spec.labels))) + list(spec.label_names)
            checker.bad(i, f"column 'label': unknown label {row['label']!r}; allowed: {allowed}")
            continue
        rows.append((texts, gold))
    if not rows:
        raise DatasetError(f"{source}: no usable rows (skipped: {checker.skipped})")
    return rows


def load_split(spec: NLUSpec, data_dir: str | None, split: str, skip: bool = False) -> list[Row]:
    """A split from local files in the official layout under `data_dir`, else from the hub."""
    if data_dir is None:
        return check_rows(spec, read_hub(spec, split), spec.hub_name(split), skip)
    path = local_file(spec, Path(data_dir), split)
    return check_rows(spec, read_local(spec, path), str(path), skip)


def mixture_sizes(sizes: list[int], mixing: str, temperature: float) -> list[int]:
    """Rows drawn from each task for one multi-task epoch of sum(sizes) rows: proportional to
    the task sizes, or to size^(1/T) (temperature sampling: T > 1 lifts the small tasks)."""
    total = sum(sizes)
    if mixing == "proportional":
        return list(sizes)
    weights = [n ** (1.0 / temperature) for n in sizes]
    return [max(1, round(total * w / sum(weights))) for w in weights]


# -- the task -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NLUOptions:
    shots: int = 0
    invalid_reward: float = 0.0
    mixing: str = "proportional"
    mixing_temperature: float = 2.0
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    seed: int = 1234


class NLUTask(Task, ModelRecipe):
    """One or several NLU tasks. `splits(spec, split)` returns a task's rows; training mixes the
    tasks, evaluation keeps each task's own set. The embedded model is warm-started by language
    modelling on the training prompts."""

    def __init__(
        self, name: str, specs: list[NLUSpec], splits: Callable[[NLUSpec, str], list[Row]],
        options: NLUOptions,
    ) -> None:
        self.name = name
        self.specs = specs
        self.splits = splits
        self.options = options
        self._cache: dict[tuple[str, int], list[TaskExample]] = {}

    def rows(self, spec: NLUSpec, split: str) -> list[Row]:
        limit = self.options.max_train_rows if split == "train" else self.options.max_eval_rows
        return self.splits(spec, split)[:limit]

    def format(self, spec: NLUSpec, texts: dict[str, str], gold: int) -> TaskExample:
        return TaskExample(
            spec.template.format(**texts), " " + spec.labels[gold],
            make_reference(spec.name, gold, spec.labels, self.options.invalid_reward),
        )

    def shots_prefix(self, spec: NLUSpec, shots: int) -> str:
        """`shots` fixed, seeded training examples with their answers (in-context examples)."""
        train = self.rows(spec, "train")
        picks = random.Random(self.options.seed).sample(train, min(shots, len(train)))
        return "".join(
            (ex := self.format(spec, t, g)).prompt + ex.answer + "\n\n" for t, g in picks
        )

    def examples(self, split: str, shots: int | None = None) -> list[TaskExample]:
        """`shots` (default: the configured ones) in-context examples before every prompt."""
        check_split(split)
        shots = self.options.shots if shots is None else shots
        if (split, shots) not in self._cache:
            per_task = []
            for spec in self.specs:
                prefix = self.shots_prefix(spec, shots) if shots else ""
                per_task.append([
                    TaskExample(prefix + ex.prompt, ex.answer, ex.reference)
                    for ex in (self.format(spec, t, g) for t, g in self.rows(spec, split))
                ])
            if split == "train" and len(per_task) > 1:
                per_task = self.mix(per_task)
            self._cache[split, shots] = [ex for part in per_task for ex in part]
        return self._cache[split, shots]

    def mix(self, per_task: list[list[TaskExample]]) -> list[list[TaskExample]]:
        """Each task resampled (seeded, with repeats past its size) to its mixture share."""
        sizes = mixture_sizes([len(p) for p in per_task], self.options.mixing,
                              self.options.mixing_temperature)
        rng = random.Random(self.options.seed)
        return [rng.sample(p * (-(-k // len(p))), k) for p, k in zip(per_task, sizes, strict=True)]

    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        """Another label word, drawn with `rng`."""
        labels = json.loads(example.reference)["labels"]
        return " " + rng.choice([w for w in labels if " " + w != example.answer])

    def count_invalid(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        invalid = sum(parse_answer(r, json.loads(ref)["labels"]) == INVALID for r, ref in pairs)
        return {"invalid_answers": invalid}

    def answer_metrics(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        return answer_metrics(pairs, {s.name: s for s in self.specs})

    @property
    def model_recipe(self) -> ModelRecipe:
        return self

    def warm_start_examples(self) -> list[TaskExample]:
        """Language modelling on unlabelled text (the inputs, never the labels), so zero-shot
        answers start from the model's ignorance."""
        return [TaskExample("", ex.prompt) for ex in self.examples("train", shots=0)]

    def tokenizer_corpus(self) -> Iterator[str]:
        for split in ("train", "eval"):
            for ex in self.examples(split, shots=0):
                yield ex.prompt + ex.answer

    def recipe(self) -> dict:
        return {"name": self.name, "tasks": [s.name for s in self.specs], **vars(self.options)}


def glue_task(
    name: str, task_names: list[str], options: NLUOptions, data_dir: str | None,
    skip_bad_rows: bool,
) -> NLUTask:
    """The GLUE / SuperGLUE tasks `task_names` (mixed in training if several), their rows read
    on first use from `data_dir` (the official layouts) or else the hub."""
    cache: dict[tuple[str, str], list[Row]] = {}

    def splits(spec: NLUSpec, split: str) -> list[Row]:
        if (spec.name, split) not in cache:
            cache[spec.name, split] = load_split(spec, data_dir, split, skip_bad_rows)
        return cache[spec.name, split]

    return NLUTask(name, [get_spec(t) for t in task_names], splits, options)
