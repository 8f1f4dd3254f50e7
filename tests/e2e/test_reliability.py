"""Rollout and reward actors killed by pid mid-run are restarted, resynced and their work
re-sent, with every prompt accounted for exactly once (lost nodes: test_node_loss.py)."""

from __future__ import annotations

import os
import signal
import time

from helpers import assert_each_prompt_once
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics

ITERATIONS = 6
SHORT_RUN = [
    f"iterations={ITERATIONS}", "checkpoint_every=2", "eval_every=0",
    "logging.rollouts_parquet=true", "prompts_per_iteration=16",
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
