"""`lorafleet bench sweep`'s tables and verdicts, from the records it reads: summary.json and
metrics rows of the shape a real run writes (tests/data/single_run: `lorafleet train
iterations=2 prompts_per_iteration=8 eval_every=0`), their timings and held-out figures set to
round numbers so every figure can be worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import numbers, table_cells
from lorafleet.cluster.bench.sweep import (
    figures_table,
    held_out_table,
    run_record,
    side_figures,
    sweep_report,
    trl_shape,
    verdicts,
)
from lorafleet.cluster.cli import parse
from lorafleet.common.configio import ConfigError
from lorafleet.common.run_dir import RunDir

REAL_RUN = run_record(RunDir(Path(__file__).parents[1] / "data" / "single_run"))
SEEDS = [0, 1, 2, 3]


def record(greedy: float | None, steps: list[float], generate: float, **summary) -> dict:
    """The real run's summary and rows (3 iterations of 256 samples, 0.5 s of update each),
    with this held-out greedy (None: stopped before its final evaluation), step times,
    generation seconds per iteration and summary figures."""
    real = REAL_RUN["summary"]
    final = {"final_eval_reward": real["final_eval_reward"], "final_eval_greedy": greedy}
    if greedy is None:
        final = {}
    first = REAL_RUN["rows"][0]
    rows = [first | {"iteration": i, "samples": 256, "step_seconds": step, "train_seconds": 0.5,
                     "response_tokens": 768, "rollout_tokens_per_s": 768 / generate}
            for i, step in enumerate(steps)]
    base = {k: v for k, v in real.items() if k != "final_eval_greedy"}
    return {"summary": base | final | summary, "rows": rows}


def results(sweep_greedy: list[float | None]) -> dict:
    # the sweep: one round per iteration, each round as long as its slowest policy row (2.3 s)
    # and one generation call for all policies (counted once: the longest, 2.0 s)
    policies = {
        f"seed={seed}": {"seed": seed, **record(
            greedy, [3.0, 2.0 + 0.1 * seed, 2.0 + 0.1 * seed], 0.5 * (1 + seed))}
        for seed, greedy in zip(SEEDS, sweep_greedy, strict=True)
    }
    root = {"policies": {name: {} for name in policies}, "wall_seconds": 80.0,
            "startup_seconds": 35.0, "learner_peak_mib": 900.0}
    singles = [{"seed": seed, "command_seconds": 50.0, **record(
        greedy, [2.0, 1.0, 1.0], 0.5, startup_seconds=30.0, learner_peak_mib=peak)}
        for seed, greedy, peak in zip(SEEDS, [0.80, 0.90, 0.85, 0.88], [680, 700, 690, 685],
                                      strict=True)]
    # run_trl's result of each seed
    trl = [{"seed": seed, "command_seconds": 40.0, "first_step_seconds": 10.0,
            "step_seconds": [1.5, 1.0, 0.8], "samples": [256] * 3, "reward": [0.3, 0.5, 0.7]}
           for seed in SEEDS]
    return {"config": "deploy/configs/default.yaml", "seeds": SEEDS,
            "shape": {"model": "tiny", "steps": 3, "prompts": 64, "samples": 4,
                      "max_new_tokens": 6, "bf16": False},
            "provenance": "`lorafleet bench sweep` at commit abc on a CPU (2 cores)",
            "sweep": {"command_seconds": 90.0, "summary": root, "policies": policies},
            "singles": singles, "trl": trl}


def test_the_fixture_is_a_real_run():
    assert [r["iteration"] for r in REAL_RUN["rows"]] == [0, 1]  # the eval row left out
    assert {"startup_seconds", "learner_peak_mib", "final_eval_greedy"} <= set(
        REAL_RUN["summary"])


def test_figures_of_the_three_sides():
    cells = table_cells(figures_table(side_figures(results([0.82, 0.85, 0.86, 0.88])), 4))
    assert cells["figure"] == ["sweep: 4 policies, one fleet", "4 single runs, one after the "
                               "other", "4 TRL GRPO runs", "sweep / singles", "sweep / TRL"]
    # 90 s against 4 x 50 s and 4 x 40 s, beside the targets
    assert numbers(cells["whole command(s), s"]) == pytest.approx(
        [90, 200, 160, 0.45, 0.50, 0.56, 0.67])
    assert numbers(cells["samples trained"]) == [3072, 3072, 3072]
    # 3072 samples over each side's whole time
    assert numbers(cells["samples/s, whole command(s)"]) == pytest.approx(
        [34.1, 15.4, 19.2, 2.22, 1.78])
    # after 2 warm-up iterations: the sweep's last round 1024 samples in 2.3 s; the singles'
    # last steps 256 in 1.0 s; TRL's 256 in 0.8 s
    assert numbers(cells["samples/s, steady state"]) == pytest.approx(
        [445.2, 256.0, 320.0, 1.74, 1.39])
    # summary startup_seconds (TRL: launch -> first step) and its share of the command
    assert numbers(cells["start-up paid (TRL: to its first step)"]) == pytest.approx(
        [35.0, 39, 120.0, 60, 40.0, 25, 0.29, 0.88])
    # 3 joint updates of 0.5 s (each of the 4 policies' rows carries its round's call's time);
    # the singles 4 x 3 updates x 0.5 s, one after the other
    assert numbers(cells["learner updates"][:2]) == pytest.approx([1.5, 2, 6.0, 3])
    assert cells["learner updates"][2:] == ["—", "0.25x", "—"]
    assert numbers(cells["generation"][:2]) == pytest.approx([6.0, 7, 6.0, 3])
    # P=4 against the largest single run's
    assert cells["learner peak memory, MiB (P=4 / P=1)"] == ["900", "700", "—", "1.29x", "—"]


def test_each_policy_next_to_its_single_run():
    cells = table_cells(held_out_table(results([0.82, 0.95, 0.85, None])))
    sampled = REAL_RUN["summary"]["final_eval_reward"]
    assert cells["seed=0"] == ["0", f"{sampled:.3f} / 0.820", f"{sampled:.3f} / 0.800"]
    assert cells["seed=1"][1:] == [f"{sampled:.3f} / 0.950", f"{sampled:.3f} / 0.900"]
    assert cells["seed=3"][1] == "—"  # stopped: no final evaluation
    assert cells["single runs' spread (greedy)"][-1] == "0.800-0.900"


def test_verdicts_name_each_target_and_what_missed_it():
    data = results([0.82, 0.95, 0.85, None])
    lines = verdicts(side_figures(data), data)
    assert lines == [
        "sweep command <= 1/2 of the single runs': 0.45x: met",
        "sweep command <= 1/1.5 of the TRL runs': 0.56x: met",
        "each policy's held-out greedy within the single runs' spread 0.800-0.900: 2/4: "
        "missed (seed=1 0.95, seed=3 stopped)",
    ]
    data = results([0.80, 0.9, 0.85, 0.0])
    data["sweep"]["command_seconds"] = 110.0
    assert [line.rsplit(": ", 1)[1] for line in verdicts(side_figures(data), data)] == [
        "missed", "missed", "missed (seed=3 0.0)"]  # 0.0 is a figure, not a stopped policy
    data = results([0.80, 0.9, 0.85, 0.88])
    assert verdicts(side_figures(data), data)[-1].endswith(": 4/4: met")


def test_report_names_its_shape_and_provenance():
    report = sweep_report(results([0.82, 0.85, 0.86, 0.88]))
    assert report.splitlines()[0].startswith(
        "bench sweep: 4 policies (seeds [0, 1, 2, 3]) of deploy/configs/default.yaml on one "
        "fleet vs 4 single runs vs 4 TRL GRPO runs; 3 iterations of 64 prompts x 4 samples")
    assert report.splitlines()[1] == "`lorafleet bench sweep` at commit abc on a CPU (2 cores)"
    assert "- sweep command <= 1/2 of the single runs': 0.45x: met" in report


def test_cli_takes_the_bench():
    args = parse(["bench", "sweep", "--iterations", "3", "rollout.num_workers=1"])
    assert (args.what, args.iterations, args.seeds, args.items) == (
        "sweep", 3, None, ["rollout.num_workers=1"])


def test_trl_runs_at_the_jobs_shape():
    shape = trl_shape(None, ["iterations=3", "learner.autocast=bf16"])  # the default job
    assert {k: v for k, v in shape.items() if k != "model"} == {
        "steps": 3, "prompts": 64, "samples": 4, "max_new_tokens": 6, "bf16": True}
    # TRL's side trains the default task only: another one is refused before anything runs
    with pytest.raises(ConfigError, match="TRL's side trains the default task"):
        trl_shape(None, ["task.max_operand=9"])
