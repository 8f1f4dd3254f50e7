"""The learner role: one base model with LoRA adapters and the algorithms that train them."""

from __future__ import annotations


def learner_class(algo_name: str) -> type:
    """The learner class that runs `algo.name` (imports torch/PEFT only when called)."""
    from .critic_free_learner import CriticFreeLearner
    from .ppo_learner import PPOLearner

    return PPOLearner if algo_name == "ppo" else CriticFreeLearner
