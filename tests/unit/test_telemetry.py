"""Run sinks besides metrics.jsonl: wandb (the real library, offline mode as on a machine with
no key) and the Parquet rollout log."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lorafleet.cluster.config import TrainConfig
from lorafleet.cluster.telemetry import WandbLogger, write_rollouts
from lorafleet.common.records import Prompt, Rollout, ScoredRollout
from lorafleet.common.run_dir import RunDir

SECRET = "lorafleet-test-key-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("key", [None, SECRET])
def test_wandb_records_offline_and_keeps_the_key_out_of_the_run(tmp_path, monkeypatch, key):
    """Without a key (and no login) wandb records offline; with one (here offline too, no
    network) the key never lands in the run directory."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if key is not None:
        monkeypatch.setenv("WANDB_API_KEY", key)
        monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no stored login
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrainConfig(run_dir=str(tmp_path / "myrun"))
    run_dir = RunDir(tmp_path / "myrun")
    run_dir.path.mkdir()
    logger = WandbLogger(cfg, run_dir)
    assert logger.run.settings.mode == "offline"
    assert logger.run.config["algo"]["name"] == "ppo"
    logger.log({"stage": "rl", "iteration": 0, "reward_mean": 0.25, "eval_reward": None}, 0)
    logger.log({"stage": "eval", "eval_reward": 0.3}, 0)  # same step: allowed
    logger.log({"stage": "rl", "iteration": 1, "reward_mean": 0.5}, 1)
    logger.close()
    runs = list((run_dir.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    leaked = [path for path in run_dir.path.rglob("*")
              if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not leaked


def test_rollouts_parquet_holds_every_sample(tmp_path):
    prompt = Prompt(7, "1+2=", [1, 2], {"reference": "3", "data_source": "mine"})
    scored = [
        ScoredRollout(Rollout(prompt, k, [5, 6], text, [-0.1, -0.2], "stop", 3, 1), reward,
                      rule_parts={"exact_match": reward})
        for k, (text, reward) in enumerate((("3", 1.0), ("4", 0.0)))
    ]
    path = write_rollouts(RunDir(tmp_path), 0, 12, scored)
    assert path.name == "stage0_iter00012.parquet"
    rows = pq.read_table(path).to_pylist()
    assert [(r["prompt_index"], r["sample_index"], r["response"], r["reward"]) for r in rows] == [
        (7, 0, "3", 1.0), (7, 1, "4", 0.0)
    ]
    assert rows[0]["adapter_version"] == 3 and rows[0]["iteration"] == 12
    # the row's columns travel with it into the log
    assert json.loads(rows[1]["columns"]) == {"reference": "3", "data_source": "mine"}
    assert json.loads(rows[1]["reward_parts"]) == {"exact_match": 0.0}


def test_missing_wandb_is_a_config_error(monkeypatch, tmp_path):
    import builtins

    from lorafleet.common.configio import ConfigError

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="lorafleet\\[wandb\\]"):
        WandbLogger(TrainConfig(), RunDir(tmp_path))
