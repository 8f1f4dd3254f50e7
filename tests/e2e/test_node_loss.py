"""A run on a simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and worker
nodes, each its own raylet with its own logical CPUs and custom resources) that loses nodes, as
`lorafleet train ray.address=...` meets it: the node of the rollout worker and the reward actors
first (the run waits for a node to hold their bundles, naming them, then re-places, re-syncs and
verifies the worker), then the learner's (the run stops with the resume hint), and `--resume`
on what remains continues from the last checkpoint; every prompt is trained on exactly once."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from helpers import assert_each_prompt_once, lorafleet
from lorafleet.cluster.config import load_train_config
from lorafleet.common.metrics import read_metrics
from lorafleet.common.run_dir import RunDir

ITERATIONS = 6
# The learner on node A; the rollout worker (one: a second would only repeat its recovery) and
# both reward actors on node B (worker_slot), and node C, added after B is lost, can hold them
# all and the learner.
RUN = [
    f"iterations={ITERATIONS}", "checkpoint_every=2", "eval_every=0",
    "logging.rollouts_parquet=true", "prompts_per_iteration=16", "rollout.num_workers=1",
    "learner.resources={learner_slot: 1}", "rollout.resources_per_worker={worker_slot: 1}",
    "reward.resources_per_actor={worker_slot: 1}", "placement.timeout_s=120",
]
# A dead node is seen within about 1.5 s (Ray's default: 5 missed checks 3 s apart, ~15 s).
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                   "health_check_initial_delay_ms": 0}
TIMEOUT_S = 600


@pytest.fixture
def cluster():
    """A head (no CPUs: it holds the driver and no actor) and no worker node yet; shut down
    with every node's processes at the end."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def lose(cluster, node) -> None:
    """The node and everything on it gone at once, as when its machine dies: its actors'
    processes SIGKILLed with its raylet (alone, they would answer for a second more)."""
    from ray._private import ray_constants

    [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
    for proc in psutil.Process(raylet.process.pid).children(recursive=True):
        proc.kill()
    cluster.remove_node(node, allow_graceful=False)


def wait_for(what: str, ready, run, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT_S} s"
        time.sleep(0.02)


def test_lost_nodes_are_replaced_and_the_learners_resumed(cluster, tmp_path, tokenizer):
    run_dir = RunDir(tmp_path / "run")
    learner_node = cluster.add_node(num_cpus=1, resources={"learner_slot": 1})
    worker_node = cluster.add_node(num_cpus=2, resources={"worker_slot": 4})
    address = f"ray.address={cluster.address}"
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        first = lorafleet("train", *RUN, address, f"run_dir={run_dir}", stdout=out)
    try:
        # Right after iteration 1's row the worker holds the swap to version 2, its probe and
        # batch 2: those calls fail with the node, and the fleet waits for a node to hold
        # its bundle.
        wait_for("iteration 1", lambda: len(read_metrics(run_dir)) >= 2, first, log)
        lose(cluster, worker_node)
        waiting = re.compile(
            r"rollout actor \d: its bundle \{'CPU': 0.5, 'worker_slot': 1.0\} \(keys: "
            r"rollout.cpus_per_worker, rollout.resources_per_worker.worker_slot\) has no node "
            r"since its node was lost \(free in the cluster: \{'CPU': [\d.]+, 'worker_slot': 0.0\}"
            r"\); waiting up to placement.timeout_s=120 s for a node to hold it")
        wait_for("the wait for a node", lambda: waiting.search(log.read_text()), first, log)
        cluster.add_node(num_cpus=3, resources={"worker_slot": 4, "learner_slot": 1})
        marker = run_dir.checkpoint("iter_00004") / "trainer_state.json"
        wait_for("checkpoint iter_00004", marker.exists, first, log)
        lose(cluster, learner_node)
        assert first.wait(timeout=TIMEOUT_S) == 1
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    out = log.read_text()
    assert "rollout actor 0 is back" in out, out[-3000:]
    assert "the learner actor died" in out and "(iter_00004)" in out, out[-3000:]
    assert f"lorafleet train --resume {run_dir}" in out
    killed_rows = read_metrics(run_dir)
    assert not run_dir.summary.exists() and len(killed_rows) >= 4

    # On what remains (node C holds the learner's bundle too)
    second = lorafleet("train", "--resume", str(run_dir), address)
    out, _ = second.communicate(timeout=TIMEOUT_S)
    assert second.returncode == 0, out[-3000:]
    assert "resuming" in out and "iter_00004" in out

    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))  # once each, no gaps
    assert [r["adapter_version"] for r in rows] == list(range(ITERATIONS))
    assert rows[:4] == killed_rows[:4]  # the rows before the checkpoint kept as they were
    # the worker re-placed, re-synced and verified in iteration 2; the resumed run's own
    # count starts at 0
    assert [r["worker_restarts"] for r in rows] == [0, 0, 1, 1, 0, 0]
    # Every iteration's probe shows the worker on the learner's current adapter.
    assert all(r["worker_versions"] == [r["adapter_version"]] for r in rows)
    cfg = load_train_config(run_dir.config)
    assert [r["prompt_cursor"] for r in rows] == [
        (it + 1) * cfg.prompts_per_iteration for it in range(ITERATIONS)]
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    assert run_dir.read_summary()["resumed_from"].endswith("iter_00004")
