"""A warm fleet as a user runs it: `lorafleet up`, two default jobs on it, then `lorafleet
down`. Each job attaches to the fleet's learner and engine (no Ray or engine start of its own)
and gets the same figures as the other, and as the same job with a fleet of its own: nothing
of one job stays in the actors for the next. A job the fleet cannot serve, or that finds it held
by another, is refused with what to do. The pieces (a learner attached to a new job, which
engine fits which job) are unit-tested in CI, tests/unit/test_warm_fleet.py."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from lorafleet.cluster.warm import LOCK, WarmState

JOB = ["iterations=4", "eval_every=0", "checkpoint_every=0"]


def lorafleet(env, *args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lorafleet.cluster.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{args}: {done.returncode}\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def rewards(run_dir) -> list[float]:
    return [json.loads(line)["reward_mean"] for line in (run_dir / "metrics.jsonl").open()
            if "iteration" in json.loads(line)]


@pytest.fixture
def warm_env(tmp_path):
    env = {**os.environ, "LORAFLEET_WARM_DIR": str(tmp_path / "warm")}
    env.pop("RAY_ADDRESS", None)
    lorafleet(env, "up")
    yield env
    lorafleet(env, "down")
    state = WarmState.read(tmp_path / "warm")
    assert state is None


def test_jobs_on_a_warm_fleet_run_as_alone(warm_env, tmp_path):
    state = WarmState.read(tmp_path / "warm")
    runs = [tmp_path / name for name in ("warm1", "warm2", "own")]
    for run, extra in zip(runs, ([], [], ["ray.warm_fleet=off"]), strict=True):
        out = lorafleet(warm_env, "train", *JOB, f"run_dir={run}", *extra).stdout
        assert ("warm fleet: joined" in out) == (not extra)
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    assert [s["warm_fleet"] for s in summaries] == [state.address, state.address, None]
    assert "engine attached" in summaries[1]["actor_startup"]["lorafleet-learner"]
    assert rewards(runs[0]) == rewards(runs[1]) == rewards(runs[2])

    refused = lorafleet(warm_env, "train", *JOB, "lora.rank=16", f"run_dir={tmp_path / 'r16'}",
                        check=False)
    assert refused.returncode == 1 and "max_lora_rank" in refused.stderr
    assert "ray.warm_fleet=off" in refused.stderr
    with open(tmp_path / "warm" / LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = lorafleet(warm_env, "train", *JOB, f"run_dir={tmp_path / 'busy'}", check=False)
    assert busy.returncode == 1 and "runs another job" in busy.stderr
    assert state.alive()
