"""The reward adapter on the learner (PERL: the reward model on the learner's own base, next
to the policy): trained by the rm stage or loaded from a saved reward model; scores rollouts."""

from __future__ import annotations

from pathlib import Path

from ..common.records import OfflineStats, PreferencePair
from ..common.specs import LearnerSpec
from .core import LearnerCore
from .model import REWARD, load_adapter
from .reward_model import (
    RewardModelTrainer,
    attach_reward_model,
    read_reward_model_meta,
    rollout_rows,
    save_reward_model,
    score_rows,
)


class RewardAdapter:
    def __init__(self, core: LearnerCore, spec: LearnerSpec, dtype: str,
                 lr: float | None = None) -> None:
        """dtype: the base's (model.dtype as resolved); lr: a fresh reward adapter + head that
        the rm stage trains, None: one to `load`. A fresh one takes the first policy's LoRA
        settings (an rm stage's run has one policy)."""
        self.core, self.spec, self.dtype = core, spec, dtype
        self.lora = spec.policies[0].lora
        self.trainer: RewardModelTrainer | None = None
        if lr is not None:
            core.net.add_adapter(REWARD, self.lora)
            self.trainer = RewardModelTrainer(core.net, lr, core.max_grad_norm, core.pad_id)
        self.tokenizer = None  # loaded by the first `score`

    def step(self, pairs: list[PreferencePair]) -> OfflineStats:
        return self.trainer.step(pairs)

    def evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.trainer.evaluate(pairs)

    def save(self, directory: str, info: dict) -> str:
        spec = self.spec
        return str(save_reward_model(self.core.net, Path(directory), spec.model_path, self.lora,
                                     self.dtype, info))

    def load(self, directory: str) -> dict:
        """Serve a saved reward model from this base (reward.model_on_learner); it must have
        been trained on the same base model."""
        meta = read_reward_model_meta(Path(directory))
        if meta["base_model"] != self.spec.model_path:
            raise ValueError(
                f"reward model {directory} was trained on {meta['base_model']}, the learner "
                f"holds {self.spec.model_path}: reward.model_on_learner needs the same base"
            )
        if REWARD in self.core.net.heads:  # e.g. restored from a checkpoint
            load_adapter(self.core.net, REWARD, Path(directory))
        else:
            attach_reward_model(self.core.net, Path(directory))
        return meta

    def score(self, rollouts: list) -> list[float]:
        """The reward adapter's scores of finished rollouts (re-tokenised as in training)."""
        if self.tokenizer is None:
            from ..common.tiny_model import load_tokenizer

            self.tokenizer = load_tokenizer(self.spec.model_path)
        return score_rows(self.core.net, rollout_rows(self.tokenizer, rollouts),
                          self.core.pad_id)
