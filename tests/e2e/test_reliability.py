"""Rollout and reward actors that die or stop answering mid-run are restarted, re-synced and
their work re-sent, with every prompt accounted for exactly once (lost nodes:
test_node_loss.py)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from helpers import assert_each_prompt_once
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics

ITERATIONS = 6
SHORT_RUN = [
    f"iterations={ITERATIONS}", "checkpoint_every=2", "eval_every=0",
    "logging.rollouts_parquet=true", "prompts_per_iteration=16", "placement.colocate=off",
]


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


def kill_at(points: dict[tuple[str, int], tuple[str, int]]):
    """A Trainer.on_event that sends the named actor a signal (SIGKILL, or SIGSTOP: it stops
    answering) at each (event, index) point of the loop. The pids are asked for now, while
    the actors are idle: asked at the point itself, the question would wait behind the calls
    just queued on the actor."""
    pids = {name: actor_pid(name) for name, _ in points.values()}

    def on_event(event: str, index: int) -> None:
        if (event, index) in points:
            name, signum = points[event, index]
            os.kill(pids[name], signum)

    return on_event, pids


def kill_stopped(pids) -> None:
    """The stopped processes the driver did not kill (when the test failed before)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                os.kill(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_killed_rollout_and_reward_actors_are_replaced(ray_cluster, tmp_path, tokenizer):
    # Timeouts far below the defaults, and far above any call of this job (a generate call
    # takes under a second here), so that a stopped actor is found in seconds.
    cfg = load_train_config(None, [*SHORT_RUN, f"run_dir={tmp_path / 'run'}",
                                   "rollout.call_timeout_s=10", "reward.timeout_s=3"])
    # Rollout worker 1 is stopped (SIGSTOP) right after batch 4 is queued on it, behind the
    # swap to the new version and its probe: the swap is not answered within
    # rollout.call_timeout_s, the worker is killed, its queued calls fail, and the fleet
    # re-sends them to its replacement once it is re-synced and verified. Reward actor 0,
    # which scores each iteration's one batch (64 samples, reward.batch_size), is stopped after
    # update 1: its batch is not answered within 2 x reward.timeout_s, it is killed, restarted,
    # and the batch sent again. (A SIGKILLed worker is recovered the same way, without the
    # wait: tests/e2e/test_async.py, and every actor of a lost node in test_node_loss.py.)
    points = {("trained", 1): ("lorafleet-reward-0", signal.SIGSTOP),
              ("queued", 4): ("lorafleet-rollout-1", signal.SIGSTOP)}
    killed = {}
    try:
        with Trainer(cfg) as trainer:
            # Rollout worker 1 restarts unseen before the run: killed while idle and back (the
            # pid question waits for the new process) before the driver calls it again. The
            # start evaluation's first request finds it holding no adapter (never the base
            # model in its place): it is re-synced, verified and asked again.
            os.kill(actor_pid("lorafleet-rollout-1"), signal.SIGKILL)
            wait_until_restarted("lorafleet-rollout-1")
            trainer.on_event, killed = kill_at(points)
            run_dir = trainer.run()
            assert all(actor_pid(name) != pid for name, pid in killed.items())
    finally:
        kill_stopped(killed.values())

    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [r["worker_restarts"] for r in rows] == [1, 1, 1, 1, 2, 2]
    # Every iteration's probe shows every worker on the learner's current adapter, the
    # restarted ones included.
    assert all(r["worker_versions"] == [r["adapter_version"]] * 2 for r in rows)
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    summary = run_dir.read_summary()
    assert summary["worker_restarts"] == 2
    assert summary["reward_actor_restarts"] == 1 and summary["reward_batches_resent"] == 1
