"""Runs that lose processes: a driver killed after a checkpoint resumes with the same data
order, and rollout / reward actors killed by pid mid-run are restarted, resynced and their
work re-sent, with every prompt accounted for exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import assert_each_prompt_once
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics
from lorafleet.common.run_dir import RunDir

ITERATIONS = 6
SHORT_RUN = [
    f"iterations={ITERATIONS}", "checkpoint_every=2", "eval_every=0",
    "logging.rollouts_parquet=true", "prompts_per_iteration=16",
]


def lorafleet(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cluster.cli", *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs,
    )


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tokenizer):
    run_dir = RunDir(tmp_path / "run")
    first = lorafleet("train", *SHORT_RUN, f"run_dir={run_dir}")
    marker = run_dir.checkpoint("iter_00004") / "trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint at iteration 4 within 10 minutes"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    first.wait()
    killed_rows = read_metrics(run_dir)
    assert not run_dir.summary.exists() and len(killed_rows) >= 4

    second = lorafleet("train", "--resume", str(run_dir))
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out[-3000:]
    assert "resuming" in out and "iter_00004" in out

    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))  # k+1.. once, no gaps
    assert [r["adapter_version"] for r in rows] == list(range(ITERATIONS))
    assert rows[:4] == killed_rows[:4]  # the rows before the checkpoint are kept as they were
    cfg = load_train_config(run_dir.config)
    assert [r["prompt_cursor"] for r in rows] == [
        (it + 1) * cfg.prompts_per_iteration for it in range(ITERATIONS)
    ]
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    summary = run_dir.read_summary()
    assert summary["resumed_from"].endswith("iter_00004")


def actor_pid(name: str) -> int:
    import ray

    return ray.get(ray.get_actor(name).__ray_call__.remote(lambda self: os.getpid()))


def test_killed_rollout_and_reward_actors_are_replaced(ray_cluster, tmp_path, tokenizer):
    cfg = load_train_config(None, [*SHORT_RUN, f"run_dir={tmp_path / 'run'}"])
    killed: dict[str, tuple[int, int]] = {}

    def kill_when(iteration: int, name: str) -> None:
        run_dir = RunDir(tmp_path / "run")
        while len(read_metrics(run_dir)) < iteration:
            time.sleep(0.05)
        pid = actor_pid(name)
        os.kill(pid, signal.SIGKILL)
        killed[name] = (pid, iteration)

    def killer() -> None:
        kill_when(2, "lorafleet-rollout-0")
        kill_when(3, "lorafleet-reward-1")

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with Trainer(cfg) as trainer:
        run_dir = trainer.run()
    thread.join(timeout=5)
    assert set(killed) == {"lorafleet-rollout-0", "lorafleet-reward-1"}

    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert rows[-1]["worker_restarts"] == 1  # the rollout worker came back once
    # Every iteration's probe shows every worker on the learner's current adapter, the
    # restarted one included.
    assert all(r["worker_versions"] == [r["adapter_version"]] * 2 for r in rows)
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    assert run_dir.read_summary()["worker_restarts"] == 1


def test_dead_learner_ends_the_run_with_a_resume_hint(ray_cluster, tmp_path):
    from lorafleet.cluster.trainer import LearnerDied

    cfg = load_train_config(None, [*SHORT_RUN, f"run_dir={tmp_path / 'run'}"])

    def kill_learner() -> None:
        marker = RunDir(tmp_path / "run").checkpoint("iter_00002") / "trainer_state.json"
        while not marker.exists():
            time.sleep(0.05)
        os.kill(actor_pid("lorafleet-learner"), signal.SIGKILL)

    threading.Thread(target=kill_learner, daemon=True).start()
    with pytest.raises(LearnerDied) as failure, Trainer(cfg) as trainer:
        trainer.run()
    message = str(failure.value)
    assert "the learner actor died" in message and "(iter_00002)" in message
    assert f"lorafleet train --resume {tmp_path / 'run'}" in message
