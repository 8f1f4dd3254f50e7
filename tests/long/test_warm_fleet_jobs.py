"""A warm fleet as a user runs it: `lorafleet up`, two default jobs on it, then `lorafleet
down`; and `lorafleet up --serve`, two servers on it, one after the other. Each job or server
attaches to the fleet's learner and engine (no Ray or engine start of its own) and gets the
same figures as the other, and as the same job with a fleet of its own: nothing of one job
stays in the actors for the next. A job the fleet cannot serve, or that finds it held by
another, is refused with what to do. The pieces (a learner attached to a new job, which
engine fits which job) are unit-tested in CI, tests/unit/test_warm_fleet.py."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest
import tinker
from tinker_clients import TASK, fraction, greedy_answers, running_server, train_sl

from lorafleet.cluster.warm import LOCK, WarmState

HELD_OUT = TASK.examples("eval")[:32]

JOB = ["iterations=4", "eval_every=0", "checkpoint_every=0"]
FLEET = ["rollout.num_workers=1", "rollout.max_loras=2", "serve.max_adapters=4"]


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


def warm_fleet(tmp_path, *up_args):
    env = {**os.environ, "LORAFLEET_WARM_DIR": str(tmp_path / "warm")}
    env.pop("RAY_ADDRESS", None)
    lorafleet(env, "up", *up_args)
    yield env
    lorafleet(env, "down")
    state = WarmState.read(tmp_path / "warm")
    assert state is None


@pytest.fixture
def warm_env(tmp_path):
    yield from warm_fleet(tmp_path)


@pytest.fixture
def warm_serve_env(tmp_path):
    yield from warm_fleet(tmp_path, "--serve", *FLEET)


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


def supervised_client(base_url: str) -> tuple[list[float], list[str]]:
    """A client's losses over 8 supervised steps and its sampler's greedy held-out answers."""
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-warm")
    model = tinker.RestClient(base_url=base_url, api_key="tml-warm").get_server_capabilities(
        ).result().supported_models[0].model_name
    client = service.create_lora_training_client(base_model=model, rank=8, train_unembed=False)
    tokenizer = client.get_tokenizer()
    losses = train_sl(client, tokenizer, offset=0, steps=8, seed=0)
    sampler = client.save_weights_and_get_sampling_client()
    return losses, greedy_answers(sampler, tokenizer, [ex.prompt for ex in HELD_OUT])


def test_servers_on_a_warm_fleet_serve_as_alone(warm_serve_env, tmp_path):
    runs = [tmp_path / name for name in ("serve1", "serve2", "own")]
    served = []
    for run, extra in zip(runs, ([], [], ["ray.warm_fleet=off"]), strict=True):
        run.mkdir()
        with running_server(run, ["serve.port=0", *FLEET, *extra], warm_serve_env) as url:
            served.append(supervised_client(url))
        assert ("warm fleet: joined" in (run / "server.log").read_text()) == (not extra)
    assert served[0] == served[1] == served[2]
    losses, answers = served[0]
    assert losses[-1] < losses[0] and fraction(answers, [ex.answer for ex in HELD_OUT]) > 0.3

    refused = lorafleet(warm_serve_env, "train", *JOB, f"run_dir={tmp_path / 'job'}",
                        check=False)
    assert refused.returncode == 1 and "cannot run this job" in refused.stderr
    assert "ColocatedLearner" in refused.stderr and "lora_target_modules" in refused.stderr
    wrong = lorafleet(warm_serve_env, "up", "--serve", "--adapters", "2", check=False)
    assert wrong.returncode == 2 and "rollout.max_loras" in wrong.stderr  # a config error
