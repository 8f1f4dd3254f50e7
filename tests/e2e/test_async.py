"""rollout.mode=async end to end, one short run on the session cluster answering every
question: samples never lag more than rollout.max_staleness versions (and do lag: the loop
overlaps), each prompt is trained on exactly once, checkpoints record the prompts trained on
(not those drawn ahead), every sync is verified, a rollout worker killed mid-run is replaced
without losing its requests, and the policy learns."""

from __future__ import annotations

import os
import signal

from helpers import assert_each_prompt_once, assert_margin
from lorafleet.cluster.checkpoint import TrainerState
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.trainer import Trainer
from lorafleet.common.metrics import read_metrics

ITERATIONS = 10
MAX_STALENESS = 2
WINDOW = 3
# train reward, mean of the last 3 iterations - the first 3, this run's config without the
# kill (`lorafleet train iterations=10 eval_every=0 checkpoint_every=4 rollout.mode=async
# rollout.max_staleness=2 placement.colocate=off prompts_per_iteration=32 seed=S`, seeds 0-2,
# 2 cores, AMD EPYC, 30-32 s each): +0.344, +0.318, +0.404; asserted at well under half.
MIN_REWARD_GAIN = 0.12
# rollout worker 0 is killed right after batch KILL_AT is queued on it (at the end of iteration
# KILL_AT - MAX_STALENESS - 1): that request and the adapter swap queued before it are
# outstanding, so its replacement must re-sync and generate them again. Batches up to
# KILL_AT - 2 were collected and scored before the kill.
KILL_AT = 7


def actor_pid(name: str) -> int:
    import ray

    return ray.get(ray.get_actor(name).__ray_call__.remote(lambda self: os.getpid()))


def test_async_run_bounds_staleness_and_learns(ray_cluster, tmp_path, tokenizer):
    cfg = load_train_config(None, [
        f"run_dir={tmp_path / 'run'}", f"iterations={ITERATIONS}", "eval_every=0",
        "checkpoint_every=4", "logging.rollouts_parquet=true", "rollout.mode=async",
        f"rollout.max_staleness={MAX_STALENESS}", "placement.colocate=off",
        "prompts_per_iteration=32",
    ])
    with Trainer(cfg) as trainer:
        worker = actor_pid("lorafleet-rollout-0")  # asked while the worker is idle

        def kill_worker(event: str, index: int) -> None:
            if (event, index) == ("queued", KILL_AT):
                os.kill(worker, signal.SIGKILL)

        trainer.on_event = kill_worker
        run_dir = trainer.run()
    rows = read_metrics(run_dir)
    samples = cfg.prompts_per_iteration * cfg.rollout.samples_per_prompt
    assert [r["adapter_version"] for r in rows] == list(range(ITERATIONS))

    # lag = learner version - sampling version, counted per sample: batches 0..k come from
    # v0 (lag 0, 1, 2), every later batch exactly k versions behind; none beyond k
    histograms = [r["staleness_histogram"] for r in rows]
    assert all(len(h) == MAX_STALENESS + 1 and sum(h) == samples for h in histograms)
    assert histograms[:3] == [[samples, 0, 0], [0, samples, 0], [0, 0, samples]]
    assert all(h == [0, 0, samples] for h in histograms[3:KILL_AT - 1]), histograms
    # the killed worker's lost requests are generated again by its replacement, which serves
    # the learner's newest adapter: those samples lag less, never more
    assert rows[-1]["worker_restarts"] == 1
    # the learner saw the lag (vLLM's log-probs are an older policy's) and every swap was
    # verified by the probe at float32 precision
    assert rows[0]["logprob_diff_vllm"] < 1e-3 < min(r["logprob_diff_vllm"] for r in rows[1:])
    assert max(r["probe_max_logprob_gap"] for r in rows) < 1e-3
    assert all(r["samples_per_s"] > 0 and r["learner_wait_seconds"] >= 0
               and r["workers_wait_seconds"] >= 0 for r in rows)

    # exactly once: each iteration trained on its own stream batch, n samples per prompt;
    # a checkpoint's cursor is the trained one although the workers had drawn ahead
    assert [r["prompt_cursor"] for r in rows] == [
        (it + 1) * cfg.prompts_per_iteration for it in range(ITERATIONS)]
    assert_each_prompt_once(run_dir, cfg, tokenizer)
    for name in ("iter_00004", "iter_00008"):
        state = TrainerState.read(run_dir.checkpoint(name))
        assert state.prompt_cursor == int(name[-5:]) * cfg.prompts_per_iteration

    first = sum(r["reward_mean"] for r in rows[:WINDOW]) / WINDOW
    last = sum(r["reward_mean"] for r in rows[-WINDOW:]) / WINDOW
    assert_margin("async: train reward, last 3 - first 3", last - first, MIN_REWARD_GAIN)
