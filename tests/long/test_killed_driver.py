"""A driver SIGKILLed (with the Ray cluster it started) after a checkpoint resumes with the
same data order: the iterations after the checkpoint once each, the rows before it kept, every
prompt trained on exactly once. In CI, the resume after a lost learner node covers this
(tests/e2e/test_node_loss.py)."""

from __future__ import annotations

import os
import signal
import time

from helpers import assert_each_prompt_once, lorafleet
from lorafleet.cluster.config import load_train_config
from lorafleet.common.metrics import read_metrics
from lorafleet.common.run_dir import RunDir

ITERATIONS = 6
SHORT_RUN = [
    f"iterations={ITERATIONS}", "checkpoint_every=2", "eval_every=0",
    "logging.rollouts_parquet=true", "prompts_per_iteration=16",
]


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
