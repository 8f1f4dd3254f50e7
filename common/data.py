"""Prompt streams: tokenised task examples served in a seeded, reproducible order; the pad id
every padded batch uses."""

from __future__ import annotations

import random

from .records import Prompt
from .tasks.base import TaskExample


def encode_prompts(
    examples: list[TaskExample], tokenizer, max_prompt_tokens: int, first_index: int = 0,
    skipped: list[str] | None = None,
) -> list[Prompt]:
    """Tokenise with the model's own special tokens. A prompt over the limit (it would leave no
    room for the response within max_model_len) is an error that names it, or, when a
    `skipped` list is given, is left out and its text appended there for counting."""
    prompts = []
    for i, ex in enumerate(examples):
        ids = tokenizer(ex.prompt).input_ids
        if len(ids) > max_prompt_tokens and skipped is not None:
            skipped.append(ex.prompt)
            continue
        if len(ids) > max_prompt_tokens:
            raise ValueError(
                f"prompt {first_index + i} ({ex.prompt[:60]!r}...) has {len(ids)} tokens; the "
                f"limit is {max_prompt_tokens} (model.max_model_len - rollout.max_new_tokens); set "
                "rollout.too_long_prompts=skip to leave such prompts out"
            )
        prompts.append(Prompt(first_index + i, ex.prompt, ids, ex.reference))
    return prompts


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS: most hub tokenizers (Llama, Qwen base models)
    have no pad token. Every batch is right-padded under an attention mask, so the pad is
    never read."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has neither a pad nor an "
                         "EOS token: set one (tokenizer.pad_token) in the model directory")
    return tokenizer.eos_token_id


class PromptStream:
    """Epochs over the examples, each in a seeded shuffle; `cursor` counts prompts served, and
    the prompt served at position c always has index c (exactly-once accounting)."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("the prompt dataset is empty")
        self.prompts = prompts
        self.seed = seed
        self.cursor = 0
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        for position in range(self.cursor, self.cursor + size):
            epoch, offset = divmod(position, len(self.prompts))
            src = self.prompts[self._order(epoch)[offset]]
            batch.append(Prompt(position, src.text, src.token_ids, src.reference))
        self.cursor += size
        return batch


def epoch_batches(
    rows: int, batch_size: int, epochs: int, seed: int
) -> list[tuple[int, list[int]]]:
    """(epoch, row indices) minibatches: each epoch a fresh seeded shuffle of all rows."""
    batches = []
    for epoch in range(epochs):
        order = list(range(rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batches += [(epoch, order[i : i + batch_size]) for i in range(0, rows, batch_size)]
    return batches


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, held-out) split; the held-out part has at least one item."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(items) * fraction))
    if n_held >= len(items):
        raise ValueError(f"{len(items)} rows are too few to hold out {fraction:.0%} and train")
    return [items[i] for i in sorted(order[n_held:])], [items[i] for i in sorted(order[:n_held])]
