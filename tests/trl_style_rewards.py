"""Reward functions written exactly as TRL's GRPOTrainer documentation writes them (lorafleet
must run them unchanged): the length reward, a conversational format reward, and an accuracy
reward on a dataset column."""

import re

# ruff: noqa: B905 (written as TRL's docs write them, zip without strict)


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^The answer is \d+\.$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def accuracy_reward(completions, solution, **kwargs):
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if sol in content else 0.0 for content, sol in zip(contents, solution)]


def only_for_gsm(completions, data_source, **kwargs):
    """None where it does not apply, as TRL allows in multi-task training."""
    return [1.0 if source == "gsm" else None for source in data_source]
