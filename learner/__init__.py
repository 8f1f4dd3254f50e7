"""The learner role: one base model with LoRA adapters and the algorithms that train them."""

from __future__ import annotations


def learner_class(algo_name: str | None, spr_normalizer: str = "group") -> type:
    """The learner class that runs `algo.name`; None (no rl stage) is the base learner, which
    runs the offline stages only (imports torch/PEFT only when called)."""
    from .base import LearnerBase
    from .critic_free_learner import CriticFreeLearner, LearnedNormalizerSPRLearner
    from .ppo_learner import PPOLearner

    if algo_name is None:
        return LearnerBase
    if algo_name == "ppo":
        return PPOLearner
    if algo_name == "spr" and spr_normalizer == "learned":
        return LearnedNormalizerSPRLearner
    return CriticFreeLearner
