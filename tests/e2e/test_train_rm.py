"""`lorafleet train-rm` trains the reward model as the rm stage on a fleet of the learner
alone, and saves one a reward actor loads."""

from __future__ import annotations

import json

import lorafleet.cluster.trainer
from helpers import contrast_batch
from lorafleet.cluster.train_rm import train_reward_model
from lorafleet.common.metrics import read_metrics
from lorafleet.common.run_dir import RunDir
from lorafleet.reward.model import LearnedReward


def test_train_rm_is_the_rm_stage_on_the_learner_alone(ray_cluster, tokenizer, tmp_path, capsys,
                                                       monkeypatch):
    fleets = []
    start_fleet = lorafleet.cluster.trainer.start_fleet
    monkeypatch.setattr(lorafleet.cluster.trainer, "start_fleet",
                        lambda *args, **kw: fleets.append(start_fleet(*args, **kw)) or fleets[-1])
    directory = train_reward_model("deploy/configs/rm.yaml", [
        f"run_dir={tmp_path / 'rm'}", "rm.epochs=1", "rm.data.max_rows=320",
    ])
    assert [len(group.actors) for group in fleets[0].groups] == [1, 0, 0]  # no stage generates
    run_dir = RunDir(tmp_path / "rm")
    assert directory == run_dir.reward_model
    report = json.loads(run_dir.rm_eval.read_text())
    assert report["after"]["pairs"] == 32 and report["steps"] == 9  # 288 pairs, batches of 32
    assert json.loads((directory / "reward_model.json").read_text())["eval"] == report["after"]
    assert len(read_metrics(run_dir, "rm")) == 9
    out = capsys.readouterr().out
    assert f"reward model on 32 held-out pairs: accuracy {report['before']['accuracy']:.3f}" in out
    assert f"score with it: lorafleet train reward.model={directory} reward.rule_weight=0" in out
    rollouts = [s.rollout for s in contrast_batch(tokenizer, 0)]
    assert len(LearnedReward(str(directory)).score(rollouts)) == 64
