"""Chat-format arithmetic word problems for `task.name=dataset` (`lorafleet make-data
word-problems OUT.jsonl`): the worked example of bringing your own data, in the layout of a
hub math set (a `prompt` conversation and an `answer` column that `math_verify` reads).

"Tom has 12 apples. He buys 4 and gives away 5. How many apples does Tom have now?" -> "11":
a start of 2-12 and 2 or 3 steps that add or take away 1-5, phrased by a few templates; the count
never goes below zero. Rows are distinct, drawn by a seeded generator.
"""

from __future__ import annotations

import random

from ..configio import ConfigError

# (name, pronoun)
PEOPLE = (("Tom", "He"), ("Ana", "She"), ("Sam", "He"), ("Mia", "She"), ("Leo", "He"),
          ("Zoe", "She"), ("Ben", "He"), ("Eva", "She"))
ITEMS = ("apples", "books", "coins", "pens", "cards", "eggs", "stamps", "shells")
# (what adds, what takes away) per template: a person's own items, or a shared box
PERSON_STEPS = (("buys {n}", "finds {n}", "gets {n} more"),
                ("gives away {n}", "loses {n}", "sells {n}"))
BOX_STEPS = (("puts in {n}", "adds {n}"), ("takes out {n}", "removes {n}"))
START = (2, 12)
STEP = (1, 5)
ROWS, SEED = 3000, 0  # deploy/data/word_problems.jsonl


def join_steps(steps: list[str]) -> str:
    return ", ".join(steps[:-1]) + " and " + steps[-1]


def word_problem(rng: random.Random) -> tuple[str, int]:
    """One problem's text and its answer."""
    (name, pronoun), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    in_box = rng.random() < 0.5
    gains, losses = BOX_STEPS if in_box else PERSON_STEPS
    count = rng.randint(*START)
    start = count
    steps = []
    for _ in range(rng.choice((2, 3))):
        n = rng.randint(*STEP)
        if count >= n and rng.random() < 0.5:
            count -= n
            steps.append(rng.choice(losses).format(n=n))
        else:
            count += n
            steps.append(rng.choice(gains).format(n=n))
    if in_box:
        text = (f"A box holds {start} {item}. {name} {join_steps(steps)}. How many {item} are "
                "in the box now?")
    else:
        text = (f"{name} has {start} {item}. {pronoun} {join_steps(steps)}. How many {item} "
                f"does {name} have now?")
    return text, count


def word_problem_rows(rows: int = ROWS, seed: int = SEED) -> list[dict]:
    """`rows` distinct problems as {"prompt": [user message], "answer": "14"}."""
    if rows < 1:
        raise ConfigError(f"make-data word-problems: --rows must be >= 1, got {rows}")
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < rows:
        text, answer = word_problem(rng)
        seen.setdefault(text, answer)
    return [{"prompt": [{"role": "user", "content": text}], "answer": str(answer)}
            for text, answer in seen.items()]
