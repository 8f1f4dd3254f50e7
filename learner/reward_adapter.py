"""The reward adapter on the learner actor (PERL: the reward model on the learner's own base,
next to the policy): train it (the rm stage), save it, load a saved one, score rollouts."""

from __future__ import annotations

from pathlib import Path

from ..common.records import OfflineStats, PreferencePair
from .model import REWARD, load_adapter
from .reward_model import (
    RewardModelTrainer,
    attach_reward_model,
    read_reward_model_meta,
    rollout_rows,
    save_reward_model,
    score_rows,
)


class RewardAdapterMixin:
    """Uses the learner core's net, lora, model_path, dtype, pad_id and algo.max_grad_norm."""

    reward_trainer: RewardModelTrainer | None = None  # set by start_reward_model
    reward_tokenizer = None  # loaded by the first score_rollouts

    def start_reward_model(self, lr: float) -> None:
        """Add a fresh reward adapter + head (the `rm` stage trains it)."""
        self.net.add_adapter(REWARD, self.lora)
        self.reward_trainer = RewardModelTrainer(
            self.net, lr, self.algo.max_grad_norm, self.pad_id
        )

    def rm_step(self, pairs: list[PreferencePair]) -> OfflineStats:
        return self.reward_trainer.step(pairs)

    def rm_evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.reward_trainer.evaluate(pairs)

    def save_reward_model(self, directory: str, info: dict) -> str:
        return str(save_reward_model(
            self.net, Path(directory), self.model_path, self.lora, self.dtype, info
        ))

    def load_reward_model(self, directory: str) -> dict:
        """Serve a saved reward model from this base (reward.model_on_learner); it must have
        been trained on the same base model."""
        meta = read_reward_model_meta(Path(directory))
        if meta["base_model"] != self.model_path:
            raise ValueError(
                f"reward model {directory} was trained on {meta['base_model']}, the learner "
                f"holds {self.model_path}: reward.model_on_learner needs the same base"
            )
        if REWARD in self.net.heads:  # e.g. restored from a checkpoint
            load_adapter(self.net, REWARD, Path(directory))
        else:
            attach_reward_model(self.net, Path(directory))
        return meta

    def score_rollouts(self, rollouts: list) -> list[float]:
        """The reward adapter's scores of finished rollouts (re-tokenised as in training)."""
        if self.reward_tokenizer is None:
            from transformers import AutoTokenizer

            self.reward_tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return score_rows(self.net, rollout_rows(self.reward_tokenizer, rollouts), self.pad_id)
