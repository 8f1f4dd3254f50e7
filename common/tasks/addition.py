"""The default task: two-digit addition with a biased teacher for the warm start."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .base import ModelRecipe, Task, TaskExample, check_split, near_miss, teacher_answer


@dataclass(frozen=True)
class AdditionTask(Task, ModelRecipe):
    """`a+b=` -> `a+b` in decimal, operands in [0, max_operand].

    A fixed, seeded share of the operand pairs is held out for evaluation and never trained on.
    The warm-start demonstrations come from a biased teacher: with probability
    `demo_error_rate` its answer is a slip, as imperfect human demonstrations are. With
    `demo_slip="one_high"` the slip is systematic (the sum + 1, a labeller's habit): SFT
    learns the sums and the habit, so its greedy answer is the slip; RL against the
    exact-match reward removes the habit. `"near_miss"` slips off by 1 or 10 at random.
    Preference pairs reject with a near miss, or with `"random"` a uniformly drawn wrong sum.
    """

    max_operand: int = 49
    eval_fraction: float = 0.1
    demo_error_rate: float = 0.7
    demo_slip: str = "one_high"
    seed: int = 1234

    rejected_kinds = ("near_miss", "random")

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(pairs)
        n_eval = max(1, int(len(pairs) * self.eval_fraction))
        return pairs[n_eval:], pairs[:n_eval]

    def examples(self, split: str) -> list[TaskExample]:
        check_split(split)
        train, held_out = self._pairs()
        pairs = train if split == "train" else held_out
        return [TaskExample(f"{a}+{b}=", str(a + b)) for a, b in pairs]

    @property
    def model_recipe(self) -> ModelRecipe:
        return self

    def demonstration(self, example: TaskExample, rng: random.Random) -> str:
        """The teacher's answer to `example`."""
        return teacher_answer(example.answer, rng, self.demo_error_rate, self.demo_slip)

    def rejected(self, split: str, example: TaskExample, rng: random.Random, kind: str) -> str:
        """A near miss (off by 1 or 10, never the gold sum), or for `"random"` a uniformly
        drawn wrong sum in [0, 2 * max_operand]."""
        if kind == "random":
            wrong = rng.randrange(2 * self.max_operand)  # [0, 2 max] without the gold sum
            return str(wrong if wrong < int(example.answer) else wrong + 1)
        miss = near_miss(example.answer, rng)
        return str(int(example.answer) + 1) if miss == example.answer else miss

    def tokenizer_corpus(self) -> Iterator[str]:
        """The prompts and answers of both splits."""
        for split in ("train", "eval"):
            for ex in self.examples(split):
                yield ex.prompt + ex.answer

    def warm_start_examples(self) -> list[TaskExample]:
        """The noisy teacher on the training prompts."""
        return self.examples("train")

    def recipe(self) -> dict:
        # name and reward_fn were fields once; the shipped models' recipe hash covers them
        return {**asdict(self), "name": "addition", "reward_fn": "exact_match"}
