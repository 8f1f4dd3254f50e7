"""write_positive end to end through the real actors (Ray, vLLM rollout workers with LoRA,
reward pool, PEFT learner): its VADER reward rises under PPO. (The nlu-table run is in the long
tier: tests/long/test_nlu_table.py.)"""

from __future__ import annotations

from helpers import assert_margin
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics

# write_positive, 12 iterations: train reward (VADER compound) of iterations 0-4 -> 7-11, seed 0
# 0.050 -> 0.528, seed 1 -0.005 -> 0.259 (`lorafleet bench demo deploy/configs/write_positive.yaml
# --seeds 0,1`); asserted at under half the smaller gain.
MIN_COMPOUND_GAIN = 0.12


def test_write_positive_reward_rises(ray_cluster, tmp_path):
    cfg = load_train_config("deploy/configs/write_positive.yaml", [f"run_dir={tmp_path / 'w'}"])
    with Trainer(cfg) as trainer:
        run_dir = trainer.run()
    rewards = [row["reward_mean"] for row in read_metrics(run_dir)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert_margin("write_positive: train reward, last 5 - first 5", last - first,
                  MIN_COMPOUND_GAIN)
    evals = run_dir.read_summary()["stage_evals"]
    assert evals[-1]["write_positive/vader_compound"] > evals[0]["write_positive/vader_compound"]
