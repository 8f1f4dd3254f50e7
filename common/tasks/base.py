"""Verifiable tasks: prompt text, the gold answer, and the SFT corpus that warm-starts a model.

A task is data only; the reward that checks an answer lives in `reward/` and is named by
`Task.reward_fn`. `TaskConfig` (the config's `task:` section) picks one: the default two-digit
addition, a GLUE / SuperGLUE task or a mix of them (`common/nlu.py`), or the offline VADER
tasks (`common/vader_data.py`); all offer the same methods.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str  # the gold response (what SFT imitates)
    # what the reward reads beside the response: the answer itself, unless the reward needs
    # more (NLU: task, gold label id and label words, as JSON)
    reference: str = ""

    def __post_init__(self) -> None:
        if not self.reference:
            object.__setattr__(self, "reference", self.answer)


def sft_rows(examples: list[TaskExample]) -> list[dict[str, str]]:
    return [{"prompt": ex.prompt, "response": ex.answer} for ex in examples]


def preference_rows(
    examples: list[TaskExample], rejected: Callable[[TaskExample, random.Random], str], seed: int
) -> list[dict[str, str]]:
    """chosen = the gold answer, rejected = `rejected(example, rng)` (seeded)."""
    rng = random.Random(seed)
    return [{"prompt": ex.prompt, "chosen": ex.answer, "rejected": rejected(ex, rng)}
            for ex in examples]


@dataclass(frozen=True)
class AdditionTask:
    """`a+b=` -> `a+b` in decimal, operands in [0, max_operand].

    A fixed, seeded share of the operand pairs is held out for evaluation and never trained on.
    The warm-start demonstrations come from a biased teacher: with probability
    `demo_error_rate` its answer is a slip, as imperfect human demonstrations are. With
    `demo_slip="one_high"` the slip is systematic (the sum + 1, a labeller's habit): SFT
    learns the sums and the habit, so its greedy answer is the slip; RL against the
    exact-match reward removes the habit. `"near_miss"` slips off by 1 or 10 at random.
    """

    max_operand: int = 49
    eval_fraction: float = 0.1
    demo_error_rate: float = 0.7
    demo_slip: str = "one_high"
    seed: int = 1234
    name: str = "addition"
    reward_fn: str = "exact_match"

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(pairs)
        n_eval = max(1, int(len(pairs) * self.eval_fraction))
        return pairs[n_eval:], pairs[:n_eval]

    def examples(self, split: str) -> list[TaskExample]:
        train, held_out = self._pairs()
        pairs = {"train": train, "eval": held_out}.get(split)
        if pairs is None:
            raise ValueError(f"unknown split {split!r}; allowed: 'train', 'eval'")
        return [TaskExample(f"{a}+{b}=", str(a + b)) for a, b in pairs]

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """The teacher's answer to `example` (a fresh draw on every call)."""
        if rng.random() >= self.demo_error_rate:
            return example.answer
        if self.demo_slip == "one_high":
            return str(int(example.answer) + 1)
        return self.near_miss(example, rng)

    def near_miss(self, example: TaskExample, rng: random.Random) -> str:
        """The noisy teacher's slip: off by 1 or 10 (|5 - 10| = 5 is the one slip that lands on
        the gold answer; kept, since the embedded model's recipe depends on it)."""
        return str(abs(int(example.answer) + rng.choice((-10, -1, 1, 10))))

    def sft_rows(self, split: str) -> list[dict[str, str]]:
        """A prompt/response dataset with the gold answers (the `sft.data.path=task` stage)."""
        return sft_rows(self.examples(split))

    def preference_rows(
        self, split: str, seed: int = 0, rejected: str = "near_miss"
    ) -> list[dict[str, str]]:
        """Preference pairs: chosen = gold answer, rejected = a seeded near miss (off by 1 or
        10), or with `rejected="random"` a uniformly drawn wrong sum in [0, 2 * max_operand]."""
        if rejected not in ("near_miss", "random"):
            raise ValueError(f"rejected={rejected!r}; allowed: 'near_miss', 'random'")

        def near_miss(ex: TaskExample, rng: random.Random) -> str:
            miss = self.near_miss(ex, rng)
            return str(int(ex.answer) + 1) if miss == ex.answer else miss

        def random_wrong(ex: TaskExample, rng: random.Random) -> str:
            wrong = rng.randrange(2 * self.max_operand)  # [0, 2 max] without the gold sum
            return str(wrong if wrong < int(ex.answer) else wrong + 1)

        pick = random_wrong if rejected == "random" else near_miss
        return preference_rows(self.examples(split), pick, seed)

    def tokenizer_corpus(self) -> Iterator[str]:
        """Every string the tokenizer must cover (prompts and answers of both splits)."""
        for split in ("train", "eval"):
            for ex in self.examples(split):
                yield ex.prompt + ex.answer

    def warm_start_examples(self) -> list[TaskExample]:
        """The embedded model's warm start: the noisy teacher on the training prompts."""
        return self.examples("train")

    def recipe(self) -> dict:
        return asdict(self)

    def count_invalid(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        return {}  # every response is an answer (right or wrong)

    def answer_metrics(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        return {}  # the held-out reward is the accuracy


VADER_TASKS = ("sentiment_vader", "write_positive")


@dataclass
class TaskConfig:
    """The run's task; `name` picks it and the other keys configure it. Callers use the
    selected task's methods through this object (`cfg.task.examples(split)`, ...)."""

    # addition | an NLU task (`lorafleet tasks`) | multi (the NLU tasks in `tasks`) |
    # sentiment_vader | write_positive
    name: str = "addition"
    reward_fn: str | None = None  # None: the task's own (exact_match, label_match, ...)
    seed: int = 1234
    # addition: the warm-start teacher slips with probability demo_error_rate; one_high: the
    # sum + 1 (a systematic habit SFT copies and RL removes), near_miss: off by 1 or 10
    max_operand: int = 49
    eval_fraction: float = 0.1
    demo_error_rate: float = 0.7
    demo_slip: Literal["one_high", "near_miss"] = "one_high"
    # NLU tasks
    tasks: list[str] = field(default_factory=list)  # name=multi: the tasks mixed in training
    mixing: Literal["proportional", "temperature"] = "proportional"
    mixing_temperature: float = 2.0  # temperature mixing: task share ~ size^(1/T)
    data_dir: str | None = None  # official GLUE/SuperGLUE layout (SST-2/train.tsv...); None: hub
    shots: int = 0  # in-context examples before every prompt
    invalid_reward: float = 0.0  # reward of an answer that is no label word (e.g. -0.5)
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    skip_bad_rows: bool = False

    def validate(self) -> None:
        from .configio import ConfigError
        from .nlu import TASKS

        allowed = ["addition", "multi", *TASKS, *VADER_TASKS]
        if self.name not in allowed:
            raise ConfigError(f"task.name: unknown task {self.name!r}; allowed: {allowed}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or (self.name == "multi") != bool(self.tasks):
            raise ConfigError(f"task.tasks: name=multi needs NLU tasks from {list(TASKS)} "
                              f"(and only multi takes them); got {self.tasks}")

    def __post_init__(self) -> None:
        if self.reward_fn is None:  # named without building the task (no data read yet)
            self.reward_fn = {"addition": "exact_match", "write_positive": "vader_compound"}.get(
                self.name, "label_match"
            )

    @cached_property
    def impl(self):
        """The selected task (built on first use; NLU data is read then)."""
        if self.name == "addition":
            return AdditionTask(self.max_operand, self.eval_fraction, self.demo_error_rate,
                                self.demo_slip, self.seed)
        if self.name == "write_positive":
            from .vader_data import WritePositiveTask

            return WritePositiveTask()
        from .nlu import build_nlu_task

        return build_nlu_task(self)

    def examples(self, split: str) -> list[TaskExample]:
        return self.impl.examples(split)

    def sft_rows(self, split: str) -> list[dict[str, str]]:
        return self.impl.sft_rows(split)

    def preference_rows(
        self, split: str, seed: int = 0, rejected: str = "near_miss"
    ) -> list[dict[str, str]]:
        """`rejected` (dataset key task_rejected) picks the addition task's kind of wrong
        answer; the NLU tasks' rejected answer is always another label word."""
        if self.name == "addition":
            return self.impl.preference_rows(split, seed, rejected)
        if rejected != "near_miss":
            from .configio import ConfigError

            raise ConfigError(f"task_rejected={rejected!r} applies to the addition task only "
                              f"(task {self.name!r} rejects with another label word)")
        return self.impl.preference_rows(split, seed)

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        return self.impl.demonstration(example, rng)

    def tokenizer_corpus(self) -> Iterator[str]:
        return self.impl.tokenizer_corpus()

    def warm_start_examples(self) -> list[TaskExample]:
        return self.impl.warm_start_examples()

    def recipe(self) -> dict:
        return self.impl.recipe()

    def count_invalid(self, pairs: list[tuple[str, str]]) -> dict[str, int]:
        """{"invalid_answers": n} for tasks whose answers must be label words, else {}."""
        return self.impl.count_invalid(pairs)

    def answer_metrics(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """Per-task official metrics of (response, reference) pairs, keyed `task/metric`."""
        return self.impl.answer_metrics(pairs)
