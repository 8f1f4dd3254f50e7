"""The learner actor: the core (publishing, sync checks, update helpers) with the offline
stages, the reward adapter and checkpoints. Without an rl stage it runs as is (sft, dpo, rm);
each algorithm's learner subclasses it with a `train_step`."""

from __future__ import annotations

from .base import LearnerBase
from .checkpoint import CheckpointMixin
from .offline import OfflineStagesMixin
from .reward_adapter import RewardAdapterMixin


class Learner(OfflineStagesMixin, RewardAdapterMixin, CheckpointMixin, LearnerBase):
    pass
