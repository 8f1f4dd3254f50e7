"""Offline sentiment data whose labels come from VADER, not from us.

There is no GLUE download here. VADER (`vaderSentiment`, Hutto & Gilbert 2014: a published
7.5k-word valence lexicon plus rules for negation, intensifiers and "but") is an independent
sentiment analyser, so we let it label sentences:

- sentences: `FRAMES x NOUNS x (MODIFIERS x ADJECTIVES) [+ a "but"/"and" clause]`, drawn with a
  seeded RNG. The word lists are plain common words, deliberately *not* sorted by polarity
  here: which adjective is positive, what "not" or "very" does, and which clause of a "but"
  sentence wins is VADER's decision.
- label: VADER's compound score >= 0.05 -> positive (1), <= -0.05 -> negative (0), sentences in
  between (neutral) are dropped: its documented thresholds.

`lorafleet make-data sentiment DIR` writes the set in SST-2's layout (`DIR/SST-2/train.tsv`,
`dev.tsv`: `sentence<TAB>label`), which `task.name=sst2 task.data_dir=DIR` reads like GLUE's.
Two tasks use it: `sentiment_vader` (classification, SST-2's template and label words) and
`write_positive` (continue a sentence opening; its reward, VADER's compound score of the
continuation, is `reward/vader.py`). Both share one embedded model (`VADER_MODEL`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from .base import ModelRecipe, Task, TaskExample, check_split
from .nlu import SPECS, NLUOptions, NLUTask

NOUNS = ("movie", "food", "service", "plot", "music", "room", "staff", "price", "story",
         "acting", "weather", "trip", "hotel", "book", "coffee", "game")
FRAMES = ("the {noun} was", "i thought the {noun} was", "honestly, the {noun} was",
          "my friends said the {noun} was")
MODIFIERS = ("", "very ", "really ", "not ", "not very ", "quite ", "a bit ", "extremely ")
ADJECTIVES = ("good", "great", "bad", "awful", "nice", "terrible", "boring", "fun",
              "excellent", "poor", "lovely", "horrible", "amazing", "dull", "pleasant", "nasty",
              "wonderful", "sad", "happy", "ugly", "beautiful", "weak", "strong", "fine",
              "cheap", "slow", "fresh", "cold", "warm", "friendly", "rude", "clean", "dirty",
              "quiet", "loud", "long", "short", "old", "new", "simple")
THRESHOLD = 0.05  # VADER's documented neutral band
TRAIN_SIZE, EVAL_SIZE, SEED = 2000, 200, 20260
VADER_SPEC = replace(SPECS["sst2"], name="sentiment_vader", benchmark="lorafleet",
                     config="make-data sentiment")


@lru_cache(maxsize=1)
def analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError(
            "the VADER tasks need vaderSentiment: pip install -e '.[nlu]'"
        ) from exc
    return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
    """VADER's normalised sentiment of `text`, in [-1, 1]: the labels and write_positive's
    held-out metric."""
    return float(analyzer().polarity_scores(text)["compound"])


def vader_label(sentence: str) -> int | None:
    score = compound(sentence)
    return 1 if score >= THRESHOLD else 0 if score <= -THRESHOLD else None


def random_sentence(rng: random.Random) -> tuple[str, str]:
    """(opening, rest): an opening frame, then a modified adjective and maybe a clause."""
    opening = rng.choice(FRAMES).format(noun=rng.choice(NOUNS))
    rest = rng.choice(MODIFIERS) + rng.choice(ADJECTIVES)
    clause = rng.random()
    if clause < 0.35:
        rest += f" but the {rng.choice(NOUNS)} was {rng.choice(MODIFIERS)}{rng.choice(ADJECTIVES)}"
    elif clause < 0.5:
        rest += f" and {rng.choice(MODIFIERS)}{rng.choice(ADJECTIVES)}"
    return opening, rest


@lru_cache(maxsize=1)
def vader_set() -> dict[str, list[tuple[str, str, int]]]:
    """{"train", "eval"}: distinct (opening, rest, VADER label) triples, neutral ones dropped,
    half of each split positive (so chance accuracy is 0.5); no sentence is in both splits."""
    rng = random.Random(SEED)
    seen: set[str] = set()
    splits = {}
    for split, size in (("train", TRAIN_SIZE), ("eval", EVAL_SIZE)):
        by_label: dict[int, list] = {0: [], 1: []}
        while min(len(rows) for rows in by_label.values()) < size // 2:
            opening, rest = random_sentence(rng)
            sentence = f"{opening} {rest}"
            label = None if sentence in seen else vader_label(sentence)
            seen.add(sentence)
            if label is not None and len(by_label[label]) < size // 2:
                by_label[label].append((opening, rest, label))
        splits[split] = by_label[0] + by_label[1]
        rng.shuffle(splits[split])
    return splits


def sst2_rows(split: str) -> list[tuple[dict[str, str], int]]:
    """The set as SST-2 rows: ({"sentence": ...}, label)."""
    return [({"sentence": f"{o} {r}"}, label) for o, r, label in vader_set()[split]]


def write_sst2_layout(directory: Path) -> list[Path]:
    """DIR/SST-2/train.tsv and dev.tsv with GLUE's SST-2 header `sentence<TAB>label`."""
    out = directory / "SST-2"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, stem in (("train", "train"), ("eval", "dev")):
        path = out / f"{stem}.tsv"
        lines = [f"{texts['sentence']}\t{label}" for texts, label in sst2_rows(split)]
        path.write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
        paths.append(path)
    return paths


class VaderModel(ModelRecipe):
    """The embedded model both VADER tasks share: a tokenizer over the sentences and the
    classification prompts, warm-started by language modelling on the *unlabelled* training
    sentences (it has never seen a label word after a prompt)."""

    def recipe(self) -> dict:
        return {"name": "vader_sentences", "version": 1, "seed": SEED, "train": TRAIN_SIZE,
                "eval": EVAL_SIZE}

    def tokenizer_corpus(self) -> Iterator[str]:
        for split in ("train", "eval"):
            for texts, label in sst2_rows(split):
                yield VADER_SPEC.template.format(**texts) + " " + VADER_SPEC.labels[label]

    def warm_start_examples(self) -> list[TaskExample]:
        return [TaskExample("", texts["sentence"]) for texts, _ in sst2_rows("train")]


VADER_MODEL = VaderModel()


@lru_cache(maxsize=2)
def negative_rests(split: str) -> list[str]:
    """The continuations of the sentences of `split` that VADER calls negative."""
    return [" " + r for _, r, label in vader_set()[split] if label == 0]


class WritePositiveTask(Task):
    """Continue a sentence opening ("the movie was"). Examples pair each opening of the set
    with the continuation of a sentence VADER calls positive (the `sft` demonstrations; DPO's
    rejected is a negative one)."""

    def examples(self, split: str) -> list[TaskExample]:
        check_split(split)
        return [TaskExample(o, " " + r) for o, r, label in vader_set()[split] if label == 1]

    @property
    def model_recipe(self) -> ModelRecipe:
        return VADER_MODEL

    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        return rng.choice(negative_rests(split))

    def scored_rows(self, split: str) -> list[dict[str, object]]:
        """Every continuation of the set, positive or not, with VADER's compound score of the
        continuation itself (what `answer_metrics` scores)."""
        check_split(split)
        return [{"prompt": o, "response": " " + r, "score": compound(" " + r)}
                for o, r, _ in vader_set()[split]]

    def answer_metrics(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        scores = [compound(response) for response, _ in pairs]
        return {"write_positive/vader_compound": sum(scores) / len(scores)}


class SentimentVaderTask(NLUTask):
    """SST-2's template and label words on the VADER-labelled set."""

    def __init__(self, options: NLUOptions) -> None:
        super().__init__("sentiment_vader", [VADER_SPEC], lambda spec, split: sst2_rows(split),
                         options)

    @property
    def model_recipe(self) -> ModelRecipe:
        return VADER_MODEL
