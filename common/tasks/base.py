"""The task interface: what every task offers the trainer, the offline stages and the embedded
model's builder. A task is data only (prompts, gold answers, references, held-out metrics);
the reward that scores an answer lives in `reward/` and is named by the task's registration.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..configio import ConfigError

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str  # the gold response (what SFT imitates)
    # what the reward reads beside the response: the answer itself, unless the reward needs
    # more (NLU: task, gold label id and label words, as JSON)
    reference: str = ""
    # a user's dataset row (`dataset.py`): the prompt as messages (rendered with the chat
    # template when tokenised), and the row's other columns for the reward functions
    conversation: list[dict[str, str]] | None = None
    columns: dict[str, Any] | None = None
    where: str | None = None  # a user's dataset row ("FILE: row I"), named in errors about it

    def __post_init__(self) -> None:
        if not self.reference:
            object.__setattr__(self, "reference", self.answer)

    def reward_columns(self) -> dict[str, Any]:
        """What the reward functions get beside prompt and completion, by column name."""
        return self.columns if self.columns is not None else {"reference": self.reference}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: 'train', 'eval'")


def teacher_answer(gold: str, rng: random.Random, error_rate: float, slip: str) -> str:
    """The warm start's biased teacher: with probability `error_rate` a slip on the integer
    answer `gold` instead of it. `one_high`: gold + 1, a systematic habit (a labeller's) that
    SFT copies and RL against a correctness reward removes; `near_miss`: off by 1 or 10 at
    random (ignorance, which a short RL run cannot fix)."""
    if rng.random() >= error_rate:
        return gold
    if slip == "one_high":
        return str(int(gold) + 1)
    return near_miss(gold, rng)


def near_miss(gold: str, rng: random.Random) -> str:
    """Off by 1 or 10 (|5 - 10| = 5 is the one slip that lands on the gold answer; kept, since
    the shipped addition model's recipe depends on it)."""
    return str(abs(int(gold) + rng.choice((-10, -1, 1, 10))))


def sft_rows(examples: list[TaskExample]) -> list[dict[str, str]]:
    """A prompt/response dataset with the gold answers (the `sft.data.path=task` stage)."""
    return [{"prompt": ex.prompt, "response": ex.answer} for ex in examples]


class ModelRecipe(ABC):
    """What the embedded tiny model is built from (`common/tiny_model.py`). `recipe()` is
    hashed into the model's name: it must stay byte-identical for the shipped models to match.
    A recipe with a `chat_template` (Jinja) gets it on its tokenizer, with its special tokens
    (`chat_tokens`, the last one the end of a turn: the EOS), and is warm-started on prompts
    rendered with it."""

    chat_template: str | None = None
    chat_tokens: tuple[str, ...] = ()

    @abstractmethod
    def recipe(self) -> dict: ...

    @abstractmethod
    def tokenizer_corpus(self) -> Iterable[str]:
        """Every string the tokenizer must cover."""

    @abstractmethod
    def warm_start_examples(self) -> list[TaskExample]:
        """The examples of the full-parameter SFT warm start."""

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """The warm start's answer to `example` (a fresh draw on every call)."""
        return example.answer


class Task(ABC):
    """A task: its examples per split, preference pairs, and held-out metrics."""

    # kinds of rejected answer for preference pairs (the dataset key `task_rejected`)
    rejected_kinds: tuple[str, ...] = ("near_miss",)

    @abstractmethod
    def examples(self, split: str) -> list[TaskExample]:
        """The prompts and gold answers of `split` ("train" or "eval")."""

    @property
    @abstractmethod
    def model_recipe(self) -> ModelRecipe:
        """What the embedded tiny model for this task is built from."""

    @abstractmethod
    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        """A wrong answer of `kind` (one of `rejected_kinds`) to `example` of `split`."""

    def scored_rows(self, split: str) -> list[dict[str, object]]:
        """Responses of every quality with a score from a judge outside the project (the meet
        stage's `data.path=task`): {"prompt", "response", "score"} rows."""
        raise ConfigError(f"task {type(self).__name__} has no scored responses: give meet.data"
                          ".path a file with a level or score column")

    def preference_rows(
        self, split: str, seed: int = 0, rejected: str = "near_miss"
    ) -> list[dict[str, str]]:
        """chosen = the gold answer, rejected = `self.rejected(...)` of kind `rejected`, drawn
        with a generator seeded by `seed`."""
        if rejected not in self.rejected_kinds:
            raise ConfigError(f"task_rejected={rejected!r}: this task rejects with "
                              f"{', '.join(self.rejected_kinds)} only")
        rng = random.Random(seed)
        return [
            {"prompt": ex.prompt, "chosen": ex.answer,
             "rejected": self.rejected(split, ex, rng, rejected)}
            for ex in self.examples(split)
        ]

    def count_invalid(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        """{"invalid_answers": n} of (response, reference) pairs for tasks whose answers must be
        label words; {} where every response is an answer (right or wrong)."""
        return {}

    def answer_metrics(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """The task's own held-out metrics of (response, reference) pairs, keyed `task/metric`;
        {} where the held-out reward is the metric."""
        return {}
