"""The learner actor: the core (publishing, sync checks, update helpers) with the offline
stages (sft, dpo, meet), the reward adapter and checkpoints. Without an rl stage it runs as
is; each algorithm's learner subclasses it with a `train_step`."""

from __future__ import annotations

from .base import LearnerBase
from .checkpoint import CheckpointMixin
from .meet import MeetMixin
from .offline import OfflineStagesMixin
from .reward_adapter import RewardAdapterMixin


class Learner(OfflineStagesMixin, MeetMixin, RewardAdapterMixin, CheckpointMixin, LearnerBase):
    pass
