"""Verifiable tasks: prompt text, the gold answer, and the SFT corpus that warm-starts a model.

A task is data only; the reward that checks an answer lives in `reward/` and is named by
`Task.reward_fn`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str


@dataclass(frozen=True)
class AdditionTask:
    """`a+b=` -> `a+b` in decimal, operands in [0, max_operand].

    A fixed, seeded share of the operand pairs is held out for evaluation and never trained on.
    The warm-start demonstrations come from a noisy teacher: with probability
    `demo_error_rate` its answer is a near miss (off by 1 or 10), as imperfect human
    demonstrations are. SFT imitates that noise; RL against the exact-match reward removes it.
    """

    max_operand: int = 49
    eval_fraction: float = 0.1
    demo_error_rate: float = 0.5
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
        """The noisy teacher's answer to `example` (fresh noise on every call)."""
        if rng.random() >= self.demo_error_rate:
            return example.answer
        return self.near_miss(example, rng)

    def near_miss(self, example: TaskExample, rng: random.Random) -> str:
        """The noisy teacher's slip: off by 1 or 10 (|5 - 10| = 5 is the one slip that lands on
        the gold answer; kept, since the embedded model's recipe depends on it)."""
        return str(abs(int(example.answer) + rng.choice((-10, -1, 1, 10))))

    def sft_rows(self, split: str) -> list[dict[str, str]]:
        """A prompt/response dataset with the gold answers (the `sft.data.path=task` stage)."""
        return [{"prompt": ex.prompt, "response": ex.answer} for ex in self.examples(split)]

    def preference_rows(
        self, split: str, seed: int = 0, rejected: str = "near_miss"
    ) -> list[dict[str, str]]:
        """Preference pairs: chosen = gold answer, rejected = a seeded near miss (off by 1 or
        10), or with `rejected="random"` a uniformly drawn wrong sum in [0, 2 * max_operand]."""
        if rejected not in ("near_miss", "random"):
            raise ValueError(f"rejected={rejected!r}; allowed: 'near_miss', 'random'")
        rng = random.Random(seed)
        rows = []
        for ex in self.examples(split):
            if rejected == "random":
                wrong = rng.randrange(2 * self.max_operand)  # [0, 2 max) minus the gold sum
                answer = str(wrong if wrong < int(ex.answer) else wrong + 1)
            else:
                answer = self.near_miss(ex, rng)
                if answer == ex.answer:
                    answer = str(int(ex.answer) + 1)
            rows.append({"prompt": ex.prompt, "chosen": ex.answer, "rejected": answer})
        return rows

    def tokenizer_corpus(self) -> Iterator[str]:
        """Every string the tokenizer must cover (prompts and answers of both splits)."""
        for split in ("train", "eval"):
            for ex in self.examples(split):
                yield ex.prompt + ex.answer


TASKS = {"addition": AdditionTask}


def get_task(name: str, **kwargs: object) -> AdditionTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](**kwargs)  # type: ignore[arg-type]
