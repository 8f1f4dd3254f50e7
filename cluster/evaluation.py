"""Held-out evaluation, one path for every caller: the Trainer's (prompts through the fleet's
served adapters) and `lorafleet eval`'s (one in-process vLLM engine). The caller brings the
generation and the scoring; the metrics are computed here."""

from __future__ import annotations

from collections.abc import Callable

from ..common.config import RolloutConfig
from ..common.metrics import mean
from ..common.records import Prompt, Rollout, ScoredRollout
from ..common.tasks.base import Task

# generate(prompts, n=..., temperature=..., seed=...): n samples per prompt
Generate = Callable[..., list[Rollout]]
Score = Callable[[list[Rollout]], list[ScoredRollout]]


def answer_pairs(scored: list[ScoredRollout]) -> list[tuple[str, str]]:
    return [(s.rollout.response_text, s.rollout.prompt.reference) for s in scored]


def evaluate_prompts(
    generate: Generate, score: Score, prompts: list[Prompt], task: Task,
    rollout: RolloutConfig, seed: int, *, sampled: bool = True, reward_parts: bool = False,
) -> dict[str, float]:
    """`eval_reward`: the mean reward of samples drawn as in training (rollout's
    samples_per_prompt and temperature; the quantity RL maximises), when `sampled`;
    `eval_greedy`: of greedy answers (accuracy); with `reward_parts` each one's rule and
    reward-model means (`{key}_rule`, `{key}_model`); then the task's own metrics of the
    greedy answers (NLU: each task's official metrics and invalid-answer rate)."""
    passes = [("eval_reward", rollout.samples_per_prompt, rollout.temperature)] if sampled else []
    result = {}
    for key, n, temperature in [*passes, ("eval_greedy", 1, 0.0)]:
        scored = score(generate(prompts, n=n, temperature=temperature, seed=seed))
        result[key] = mean([s.reward for s in scored])
        if reward_parts:
            result[f"{key}_rule"] = mean([s.rule_reward for s in scored])
            result[f"{key}_model"] = mean([s.model_reward for s in scored])
    # `scored` is the greedy pass here
    return {**result, **task.answer_metrics(answer_pairs(scored))}
