"""Prompt streams: tokenised task examples served in a seeded, reproducible order; the pad id
every padded batch uses."""

from __future__ import annotations

import random
from dataclasses import replace

from .configio import ConfigError
from .corpora import DatasetError
from .records import Prompt
from .tasks.base import TaskExample


def render_prompt(example: TaskExample, tokenizer) -> tuple[str, list[int]]:
    """The prompt's text and token ids: a plain prompt with the model's own special tokens; a
    conversation through the tokenizer's chat template, opened for the assistant's reply (the
    template writes the special tokens itself)."""
    if example.conversation is None:
        return example.prompt, tokenizer(example.prompt).input_ids
    if not tokenizer.chat_template:
        raise ConfigError(
            f"prompt {example.prompt[:60]!r} is a conversation, but the tokenizer of "
            f"{tokenizer.name_or_path} has no chat template: set model.chat_template (a Jinja "
            "string) or give the prompts as plain strings"
        )
    text = tokenizer.apply_chat_template(
        example.conversation, add_generation_prompt=True, tokenize=False
    )
    return text, tokenizer(text, add_special_tokens=False).input_ids


def encode_prompts(
    examples: list[TaskExample], tokenizer, max_prompt_tokens: int, first_index: int = 0,
    skipped: list[str] | None = None,
) -> list[Prompt]:
    """Tokenise (`render_prompt`). A prompt over the limit (it would leave no room for the
    response within max_model_len) is an error that names it, or, when a `skipped` list is
    given, is left out and its text appended there for counting."""
    prompts = []
    for i, ex in enumerate(examples):
        text, ids = render_prompt(ex, tokenizer)
        if len(ids) > max_prompt_tokens and skipped is not None:
            skipped.append(text)
            continue
        if len(ids) > max_prompt_tokens:
            what = f"prompt {first_index + i}" if ex.where is None else ex.where
            raise DatasetError(
                f"{what} ({text[:60]!r}...) has {len(ids)} tokens; the "
                f"limit is {max_prompt_tokens} (model.max_model_len - rollout.max_new_tokens); set "
                "rollout.too_long_prompts=skip to leave such prompts out"
            )
        prompts.append(Prompt(first_index + i, text, ids, ex.reward_columns(), ex.conversation))
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
            batch.append(replace(src, index=position))
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
