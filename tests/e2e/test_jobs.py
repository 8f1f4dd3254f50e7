"""End to end through the real actors (Ray cluster, vLLM rollout workers with in-memory LoRA
swaps, reward pool, PEFT learner). The default job runs once, the way a Ray user runs it:
`ray start --head` on loopback and `ray job submit` with the shipped runtime_env, as three
policies on one fleet: `exact` (the default job itself), `broken` (its reward raises on its
first training batch) and `late` (its reward is slow: the others do not wait for it). The run
answers the job questions (SUCCEEDED, run directory, metrics on the head's Prometheus
endpoint), the learning ones (held-out gains, verified syncs, checkpoints, a plain-PEFT
adapter), isolation (the broken one is stopped and reported while the others finish) and the
wait limit for a late policy. SPR runs in-process on the session cluster, colocated. The long
tier adds two policies learning opposite targets on one fleet
(tests/long/test_opposite_targets.py), the default job colocated against apart
(tests/long/test_colocated_job.py) and the SFT -> SPR chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import assert_margin, hf_greedy_reward
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.local_head import AUTH_ENV, local_head
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics
from lorafleet.common.run_dir import RunDir

ITERATIONS = 8
WINDOW = 4
# The job's first 8 iterations as this test runs them, the `exact` policy of three
# (`lorafleet train deploy/configs/default.yaml iterations=8 eval_every=0 checkpoint_every=0
# placement.colocate=off late_policy_wait_s=0.25 seed=S` with POLICIES below; seeds 0, 1, 2,
# 2 cores, AMD EPYC): held-out sampled reward 3.10x-3.23x (end / start), greedy accuracy
# +0.848 to +0.868, train reward of the first 4 iterations -> the last 4 +0.230 to +0.251;
# seed 0 with ATEN_CPU_CAPABILITY=avx2: 3.12x, +0.868, +0.251. At 12 iterations the same
# figures were 3.14x-3.37x, +0.844 to +0.880 and (windows of 6) +0.200 to +0.214. Asserted
# well below the smallest value seen, so another CPU's float path cannot fail them; a flat
# curve would.
MIN_SAMPLED_RATIO = 2.0  # held-out sampled reward, end / start
MIN_GREEDY_GAIN = 0.4  # held-out greedy accuracy, end - start
MIN_REWARD_GAIN = 0.12  # train reward, mean of the last 4 iterations - the first 4


def run_short_job(config: str, tmp_path, checkpoint_every: int, iterations: int = ITERATIONS):
    """`iterations` of a shipped config, evaluated at the start and the end only."""
    cfg = load_train_config(config, [
        f"run_dir={tmp_path / 'run'}", f"iterations={iterations}",
        f"checkpoint_every={checkpoint_every}", "eval_every=0",
    ])
    with Trainer(cfg) as trainer:
        return cfg, trainer.run()


REPO = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, **AUTH_ENV}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node on 127.0.0.1 with its own ports (another local cluster may be running);
    its process group is killed at the end."""
    env = {**ENV, "RAY_metrics_report_interval_ms": "1000"}
    with local_head(tmp_path_factory.mktemp("ray"), env=env) as head:
        yield {"dashboard": head.dashboard, "metrics": head.metrics}


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


DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_status_request(dashboard: str, job_id: str) -> urllib.request.Request:
    """The job's status from the dashboard's REST API, with the head's token: polled in this
    process, since each `ray job status` is a new Python process (about 2 s of CPU taken
    from the job)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    return urllib.request.Request(f"{dashboard}/api/jobs/{job_id}",
                                  headers={"authorization": f"Bearer {token}"})


def job_status(request: urllib.request.Request) -> str:
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["status"]


def scrape(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


METRICS = {"ray_lorafleet_reward_mean", "ray_lorafleet_rollout_tokens_per_s",
           "ray_lorafleet_adapter_version", "ray_lorafleet_learner_step_seconds_bucket"}


# The job's policies: the default job, one whose reward fails, and a small one whose reward
# is 1 s late on its first training batch (`exact` waits for it at most LATE_WAIT_S).
POLICIES = ("policies=[{name: exact}, "
            "{name: broken, reward.fns: ['tests.helpers:reward_raises_on_training_prompts']}, "
            "{name: late, prompts_per_iteration: 8, "
            "reward.fns: ['tests.helpers:exact_match_slow_on_training_prompts']}]")
LATE_WAIT_S = 0.25


@pytest.fixture(scope="module")
def default_job(ray_head, tmp_path_factory):
    """The default job's first `ITERATIONS` iterations as the three POLICIES of one run,
    submitted to the head; the metric series seen on its export endpoint while the job ran."""
    run_dir = RunDir(tmp_path_factory.mktemp("default-job") / "run")
    cache = os.environ.get("LORAFLEET_CACHE", "")
    entrypoint = [
        "env", f"LORAFLEET_CACHE={cache}", sys.executable, "-m", "lorafleet.cluster.cli",
        "train", "deploy/configs/default.yaml", f"iterations={ITERATIONS}", "eval_every=0",
        "checkpoint_every=4", f"run_dir={run_dir}", POLICIES,
        f"late_policy_wait_s={LATE_WAIT_S}",
    ]
    out = ray_job("submit", "--address", ray_head["dashboard"], "--no-wait",
                  "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml",
                  "--submission-id", "lorafleet-test", "--", *entrypoint)
    assert "lorafleet-test" in out
    seen: set[str] = set()
    deadline = time.time() + 900
    status_request = job_status_request(ray_head["dashboard"], "lorafleet-test")
    while job_status(status_request) not in DONE:
        text = scrape(ray_head["metrics"])
        seen |= {name for name in METRICS if f"\n{name}{{" in text}
        assert time.time() < deadline, "job still running after 15 minutes"
        time.sleep(1)
    status = ray_job("status", "--address", ray_head["dashboard"], "lorafleet-test").lower()
    logs = ray_job("logs", "--address", ray_head["dashboard"], "lorafleet-test")
    assert "succeeded" in status, logs[-3000:]
    return run_dir, seen


def test_submitted_job_succeeds_and_exports_metrics(default_job):
    root, seen = default_job
    summary = root.read_summary()
    assert summary["iterations"] == ITERATIONS and list(summary["policies"]) == [
        "exact", "broken", "late"]
    assert all(root.policy(name).adapter.is_dir() for name in summary["policies"])
    assert "| broken |" in root.comparison.read_text()
    assert seen == METRICS, f"missing on the metrics endpoint: {METRICS - seen}"


def test_a_failing_policy_is_stopped_and_reported_alone(default_job):
    root, _ = default_job
    broken = root.policy("broken").read_summary()
    assert broken["stopped"].startswith("RewardError: reward 'tests.helpers:reward_raises_on_"
                                        "training_prompts' raised"), broken["stopped"]
    assert read_metrics(root.policy("broken")) == []  # stopped at its first training batch
    assert len(broken["stage_evals"]) == 1  # its start evaluation ran
    assert root.read_summary()["policies"]["broken"]["stopped"] == broken["stopped"]
    assert root.policy("exact").read_summary()["stopped"] is None


def test_a_late_policy_holds_the_others_back_at_most_the_wait_limit(default_job):
    """`late`'s first batch is scored 1 s after `exact`'s, more than late_policy_wait_s:
    `exact` trains it without `late` (alone in a learner call: `broken` stops on its first
    batch) and `late` catches up in later rounds; both train every iteration once, in
    order."""
    root, _ = default_job
    rows = {name: read_metrics(root.policy(name)) for name in ("exact", "late")}
    for name, policy_rows in rows.items():
        assert [r["adapter_version"] for r in policy_rows] == list(range(ITERATIONS)), name
        assert all(r["reward_errors"] == 0 for r in policy_rows), name
    assert rows["exact"][0]["policies_in_step"] == 1, "exact waited for late"
    assert root.policy("late").read_summary()["stopped"] is None


def test_default_job_learns_and_saves_a_plain_peft_adapter(default_job, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = default_job[0].policy("exact")  # the default job, a policy like any other
    cfg = load_train_config(run_dir.config)
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [r["adapter_version"] for r in rows] == list(range(ITERATIONS))
    for key in ("reward_mean", "kl", "rollout_tokens_per_s", "step_seconds"):
        assert all(isinstance(r[key], float) for r in rows), key
    # answers of at most rollout.max_new_tokens (6) tokens; the share cut off there is logged
    assert all(1 <= r["response_length_mean"] <= r["response_length_max"] <= 6 for r in rows)
    assert all(0 <= r["truncated_fraction"] <= 1 for r in rows)
    # Every sync was verified against the learner, and vLLM's sampling log-probs agree with
    # the learner's recomputation (float32 both sides).
    assert max(r["probe_max_logprob_gap"] for r in rows) < 1e-3
    assert max(r["logprob_diff_vllm"] for r in rows) < 1e-3

    assert_reward_rises("default job", rows, MIN_REWARD_GAIN, WINDOW)
    summary = run_dir.read_summary()
    start, end = summary["stage_evals"][0], summary["stage_evals"][-1]
    assert_margin("default job: held-out sampled reward, end / start",
                  end["eval_reward"] / start["eval_reward"], MIN_SAMPLED_RATIO)
    assert_margin("default job: held-out greedy accuracy, end - start",
                  end["eval_greedy"] - start["eval_greedy"], MIN_GREEDY_GAIN)

    assert run_dir.config.exists() and run_dir.reward_curve.exists()
    ckpts = sorted(p.name for p in run_dir.checkpoints.iterdir())
    assert ckpts == ["iter_00004", "iter_00008", "stage1_rl"]

    # The final adapter is plain PEFT; HF greedy decoding with it reproduces the held-out
    # reward that the vLLM fleet measured with the in-memory adapter.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = PeftModel.from_pretrained(base, str(run_dir.adapter)).eval()
    assert hf_greedy_reward(model, cfg, tiny_model_path) == pytest.approx(
        summary["final_eval_greedy"], abs=0.02
    )


def assert_reward_rises(name: str, rows: list[dict], margin: float, window: int) -> None:
    first = sum(r["reward_mean"] for r in rows[:window]) / window
    last = sum(r["reward_mean"] for r in rows[-window:]) / window
    assert_margin(f"{name}: train reward, last {window} - first {window}", last - first,
                  margin, f"({first:.3f} -> {last:.3f})")


# deploy/configs/spr.yaml, first 8 iterations (`lorafleet train deploy/configs/spr.yaml
# iterations=8 eval_every=0 checkpoint_every=0 seed=S`, seeds 0, 1, 2, 2 cores, AMD EPYC):
# train reward of iterations 0-3 -> 4-7, gain +0.232 to +0.256 (the first 12 iterations,
# 0-4 -> 7-11: +0.245 to +0.250); asserted at about half of that.
SPR_ITERATIONS = 8
SPR_WINDOW = 4
SPR_MIN_REWARD_GAIN = 0.12


def test_spr_job_reward_rises_colocated(ray_cluster, tmp_path):
    """spr.yaml on the session's local cluster without GPUs: placement.colocate=auto puts
    the learner and engine 0 in one actor (the adapter handed over in its process), every
    sync verified as the workers' are (the same job apart and colocated, compared: the long
    tier's tests/long/test_colocated_job.py)."""
    _, run_dir = run_short_job("deploy/configs/spr.yaml", tmp_path, checkpoint_every=0,
                               iterations=SPR_ITERATIONS)
    rows = read_metrics(run_dir)
    assert run_dir.read_summary()["placement"] == ("learner + engine colocated in one actor "
                                                   "(placement.colocate=auto)")
    assert [r["adapter_version"] for r in rows] == list(range(SPR_ITERATIONS))
    assert all(r["worker_versions"] == [r["adapter_version"]] for r in rows)  # one engine
    assert max(r["probe_max_logprob_gap"] for r in rows) < 1e-3
    assert max(r["logprob_diff_vllm"] for r in rows) < 1e-3
    assert all(r["value_loss"] is None and r["weight_max"] <= 4.0 for r in rows)
    assert_reward_rises("spr", rows, SPR_MIN_REWARD_GAIN, SPR_WINDOW)
    # No critic: the saved run has the policy adapter only.
    assert not (run_dir.adapter / "value").exists()
