"""Resuming a run with several policies, on real run directories (configs, metrics, checkpoint
state files as the trainer writes them): every policy goes back to the last checkpoint all of
them completed, a stopped policy stays stopped, and the set of policies cannot change."""

from __future__ import annotations

import json

import pytest

from lorafleet.cluster.checkpoint import ResumeError, TrainerState
from lorafleet.cluster.config import TrainConfig
from lorafleet.cluster.policy_state import PolicyState, resume_policies
from lorafleet.common.configio import save_config
from lorafleet.common.data import PromptStream
from lorafleet.common.records import Prompt
from lorafleet.common.run_dir import RunDir
from lorafleet.reward.normalize import RunningMoments

BATCH = 8  # prompts per iteration


def policy_at(root: RunDir, name: str, checkpoints: list[int], stopped: str | None = None
              ) -> PolicyState:
    """Policy `name` of a run under `root` that logged one row per iteration up to its last
    checkpoint's and checkpointed after each iteration of `checkpoints`."""
    run_dir = root.policy(name)
    save_config(TrainConfig(run_dir=str(run_dir)), run_dir.config)
    last = max(checkpoints)
    run_dir.metrics.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(last)))
    for it in checkpoints:
        directory = run_dir.checkpoint(f"iter_{it:05d}")
        directory.mkdir(parents=True)
        TrainerState(0, it, it * BATCH, it, [{"stage": "start"}], it,
                     RunningMoments(count=it, mean=0.5).state()).write(directory)
    if stopped:
        run_dir.write_summary({"stopped": stopped})
    prompts = [Prompt(i, f"{i}+0=", [i], {}) for i in range(64)]
    return PolicyState(name, TrainConfig(), inputs=None, run_dir=run_dir,
                       stream=PromptStream(prompts, 0))


def test_every_policy_resumes_at_the_last_checkpoint_all_of_them_completed(tmp_path):
    root = RunDir(tmp_path / "run")
    ahead = policy_at(root, "ahead", [2, 4])  # the run died after its iter_4, before the other's
    behind = policy_at(root, "behind", [2])
    stopped = policy_at(root, "stopped", [2], stopped="RewardError: reward 'f' raised")
    state, name = resume_policies([ahead, behind, stopped], root, several=True)
    assert (state.position, name) == ((0, 2), "iter_00002")
    for policy in (ahead, behind):
        assert policy.stopped is None and policy.stream.cursor == 2 * BATCH
        assert policy.resume_from == policy.run_dir.checkpoint("iter_00002")
        assert (policy.moments.count, policy.moments.mean) == (2, 0.5)
        assert len(policy.run_dir.metrics.read_text().splitlines()) == 2
    assert not ahead.run_dir.checkpoint("iter_00004").exists()  # trained again, once
    assert stopped.stopped == "RewardError: reward 'f' raised" and stopped.resume_from is None


def test_adding_or_removing_a_policy_on_resume_is_refused(tmp_path):
    root = RunDir(tmp_path / "run")
    policies = [policy_at(root, name, [2]) for name in ("x", "y")]
    with pytest.raises(ResumeError, match=r"trained policies \['x', 'y'\], the config names "
                                          r"\['x', 'y', 'z'\]; adding or removing a policy"):
        added = policy_at(RunDir(tmp_path / "other"), "z", [2])
        resume_policies([*policies, added], root, several=True)
    with pytest.raises(ResumeError, match=r"the config names \['x'\]"):
        resume_policies(policies[:1], root, several=True)
    with pytest.raises(ResumeError, match=r"the config names \[\]"):  # no policies: section
        resume_policies(policies[:1], root, several=False)
