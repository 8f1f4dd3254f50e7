"""A Ray user's path: `ray start --head` on loopback, `ray job submit` of a short job with the
shipped runtime_env, the job SUCCEEDS and leaves its run directory, and the run's metrics
appear on the head node's Prometheus export endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent
RAY = str(Path(sys.executable).parent / "ray")
# Ray's token authentication (the head generates ~/.ray/auth_token; clients send it).
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on 127.0.0.1 with its own ports (another local cluster may be running);
    its process group is killed at the end (not `ray stop`, which would stop every Ray
    cluster on the machine)."""
    names = ("gcs", "dashboard", "metrics", "agent", "agent-grpc", "client", "runtime-env")
    ports = {name: free_port() for name in names}
    env = {**ENV, "RAY_metrics_report_interval_ms": "1000"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
         f"--dashboard-agent-listen-port={ports['agent']}",
         f"--dashboard-agent-grpc-port={ports['agent-grpc']}",
         f"--ray-client-server-port={ports['client']}",
         f"--runtime-env-agent-port={ports['runtime-env']}",
         "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        dashboard = f"http://127.0.0.1:{ports['dashboard']}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 with Ray's token auth): it is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.time() < deadline, "the dashboard did not come up in 120 s"
                time.sleep(1)
        yield {"dashboard": dashboard, "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def ray_job(*args: str, timeout: float = 60) -> str:
    deadline = time.time() + 120
    while True:
        done = subprocess.run([RAY, "job", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=ENV)
        # The head's job agent starts a little after its dashboard answers.
        if "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr  # the CLI prints some verdicts on stderr


def scrape(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


def test_submitted_job_succeeds_and_exports_metrics(ray_head, tmp_path):
    run_dir = tmp_path / "job-run"
    cache = os.environ.get("LORAFLEET_CACHE", "")
    entrypoint = [
        "env", f"LORAFLEET_CACHE={cache}", sys.executable, "-m", "lorafleet.cluster.cli",
        "train", "deploy/configs/default.yaml", "iterations=12", "eval_every=0",
        f"run_dir={run_dir}",
    ]
    out = ray_job("submit", "--address", ray_head["dashboard"], "--no-wait",
                  "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml",
                  "--submission-id", "lorafleet-test", "--", *entrypoint)
    assert "lorafleet-test" in out

    seen: set[str] = set()
    wanted = {"ray_lorafleet_reward_mean", "ray_lorafleet_rollout_tokens_per_s",
              "ray_lorafleet_adapter_version", "ray_lorafleet_learner_step_seconds_bucket"}
    deadline = time.time() + 900
    while True:
        text = scrape(ray_head["metrics"])
        seen |= {name for name in wanted if f"\n{name}{{" in text}
        status = ray_job("status", "--address", ray_head["dashboard"], "lorafleet-test").lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        assert time.time() < deadline, "job still running after 15 minutes"
        time.sleep(2)
    logs = ray_job("logs", "--address", ray_head["dashboard"], "lorafleet-test")
    assert "succeeded" in status, logs[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 12 and (run_dir / "adapter").is_dir()
    assert seen == wanted, f"missing on the metrics endpoint: {wanted - seen}"
