"""Runs that lose processes: a driver killed after a checkpoint resumes with the same data
order, and rollout / reward actors killed by pid mid-run are restarted, resynced and their
work re-sent, with every prompt accounted for exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def wait_until_restarted(name: str, timeout_s: float = 120) -> None:
    """Until Ray has brought the killed actor back: a call sent before Ray saw the death
    fails, the first one after answers from the new process."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actor_pid(name)
            return
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, f"{name} was not restarted in {timeout_s} s"
            time.sleep(0.2)


def kill_at(points: dict[tuple[str, int], str]):
    """A Trainer.on_event that SIGKILLs the named actor at each (event, index) point of the
    loop. The pids are asked for now, while the actors are idle: asked at the point itself,
    the question would wait behind the calls just queued on the actor."""
    pids = {name: actor_pid(name) for name in points.values()}

    def on_event(event: str, index: int) -> None:
        name = points.get((event, index))
        if name is not None:
            os.kill(pids[name], signal.SIGKILL)

    return on_event, pids


def test_killed_rollout_and_reward_actors_are_replaced(ray_cluster, tmp_path, tokenizer):
    cfg = load_train_config(None, [*SHORT_RUN, f"run_dir={tmp_path / 'run'}"])
    # The rollout worker is killed right after batch 2 is queued on it, behind the swap to
    # the new version and its probe: those calls fail, and the fleet re-sends them to its
    # replacement once it is re-synced and verified. The reward actor is killed between
    # batches: Ray restarts it and re-runs the batch it is sent next (max_task_retries).
    points = {("queued", 2): "lorafleet-rollout-0", ("trained", 3): "lorafleet-reward-1"}
    with Trainer(cfg) as trainer:
        # Rollout worker 1 restarts unseen before the run: killed while idle and back (the
        # pid question waits for the new process) before the driver calls it again. The start
        # evaluation's first request finds it holding no adapter (never the base model in its
        # place): it is re-synced, verified and asked again.
        os.kill(actor_pid("lorafleet-rollout-1"), signal.SIGKILL)
        wait_until_restarted("lorafleet-rollout-1")
        trainer.on_event, killed = kill_at(points)
        run_dir = trainer.run()
        assert all(actor_pid(name) != pid for name, pid in killed.items())

    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [r["worker_restarts"] for r in rows] == [1, 1] + [2] * (ITERATIONS - 2)
    # Every iteration's probe shows every worker on the learner's current adapter, the
    # restarted one included.
    assert all(r["worker_versions"] == [r["adapter_version"]] * 2 for r in rows)
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    assert run_dir.read_summary()["worker_restarts"] == 2


def test_dead_learner_ends_the_run_with_a_resume_hint(ray_cluster, tmp_path):
    from lorafleet.cluster.trainer import LearnerDied

    cfg = load_train_config(None, [*SHORT_RUN, f"run_dir={tmp_path / 'run'}"])
    # killed after its update of iteration 2, the checkpoint of iterations 0-1 written: the
    # next call (publishing that update) finds it gone
    with pytest.raises(LearnerDied) as failure, Trainer(cfg) as trainer:
        trainer.on_event, _ = kill_at({("trained", 2): "lorafleet-learner"})
        trainer.run()
    message = str(failure.value)
    assert "the learner actor died" in message and "(iter_00002)" in message
    assert f"lorafleet train --resume {tmp_path / 'run'}" in message
