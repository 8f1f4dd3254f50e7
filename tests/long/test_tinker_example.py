"""deploy/examples/tinker_rl_word_problems.py, a tinker SDK client, against `lorafleet serve
deploy/configs/serve_word_problems.yaml` started as a user would (docs/tinker.md): the long tier
(`pytest -m long`, about a minute on 2 cores), outside the default run for CI's budget."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

EXAMPLE = "deploy/examples/tinker_rl_word_problems.py"
STEPS = 3
# Held-out greedy accuracy after 3 steps (`python deploy/examples/tinker_rl_word_problems.py
# --steps 3 --seed S` on one server, 2 cores): 0.020 -> 0.960-0.970 for seeds 0, 1, 2 (sampled
# reward per step 0.27-0.29 -> 0.64-0.77). Asserted at under half the smallest gain.
MIN_GREEDY_GAIN = 0.45
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 120


def accuracy(out: str, when: str) -> float:
    return float(re.search(rf"^held-out greedy accuracy {when}: ([0-9.]+)$", out, re.M)[1])


def test_sdk_example_trains_through_lorafleet_serve(tmp_path):
    run_dir = tmp_path / "serve"
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cluster.cli", "serve",
             "deploy/configs/serve_word_problems.yaml", f"run_dir={run_dir}", "serve.port=0"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (run_dir / "server.json").exists():
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no server within {START_TIMEOUT_S} s"
            time.sleep(0.5)
        base_url = json.loads((run_dir / "server.json").read_text())["base_url"]
        env = {**os.environ, "TINKER_BASE_URL": base_url, "TINKER_API_KEY": "tml-local"}
        done = subprocess.run([sys.executable, EXAMPLE, "--steps", str(STEPS)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out = done.stdout
        steps = re.findall(r"^step (\d+)  reward ([0-9.]+)  ", out, re.M)
        assert [int(step) for step, _ in steps] == list(range(STEPS))
        assert accuracy(out, "after") - accuracy(out, "before") > MIN_GREEDY_GAIN, out
        assert re.search(r"^saved state: tinker://\S+/weights/final$", out, re.M)

        server.send_signal(signal.SIGINT)  # a user's Ctrl-C: the server stops its fleet
        assert server.wait(timeout=STOP_TIMEOUT_S) == 0
        assert not (run_dir / "server.json").exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
