"""`lorafleet train-rm`: a LoRA reward model (adapter + scalar head on the base model, PERL)
trained with the Bradley-Terry loss on preference pairs, evaluated on held-out pairs, saved in
a directory the reward pool (reward.model=DIR) and the learner can load.

It is the `rm` stage run alone: the fleet then holds only the learner (no stage generates).
"""

from __future__ import annotations

from pathlib import Path

from .config import load_train_config
from .trainer import Trainer


def train_reward_model(path: str | None, overrides: list[str]) -> Path:
    """Returns the saved reward model directory (RUN_DIR/reward_model)."""
    cfg = load_train_config(path, [*overrides, "stages=[rm]"])
    with Trainer(cfg) as trainer:
        run_dir = trainer.run()
    directory = run_dir.reward_model
    print(f"saved the reward model to {directory} ({run_dir.read_summary()['wall_seconds']:.0f}"
          f" s); score with it: lorafleet train reward.model={directory} reward.rule_weight=0")
    return directory
