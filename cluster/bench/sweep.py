"""`lorafleet bench sweep`: P policies of one job (one per seed) trained at once on one fleet
(`lorafleet sweep CONFIG seed=0,1,2,3`), against the same P runs one after the other
(`lorafleet train CONFIG seed=i`) and against P TRL GRPO runs at the job's shape (prompts x
samples x new tokens, iterations: `bench vs-trl`'s TRL side). Every side runs as whole commands
in their own processes, so each pays its own start-up as a user's command does.

Prints the figures of the three sides with ratios measured in the one invocation (whole command
time, samples/s over the whole commands and in steady state, start-up paid, the learner's and
generation's share of the command time, the learner's peak memory: P policies against one);
each policy's held-out figures next to the single run of its seed, with the single runs'
spread; and whether the targets are met: the sweep's command <= 1/2 of the single runs' and
<= 1/1.5 of the TRL runs', each policy's held-out greedy within the single runs' seed spread.
Nothing is asserted; TRL is not a dependency and CI does not run this.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from ...common.configio import ConfigError
from ...common.metrics import read_metrics
from ...common.run_dir import RunDir, fresh_directory
from .harness import markdown_table, provenance, publish, ratio
from .vs_trl import steady_rate

WARMUP = 2  # first iterations of each run left out of the steady-state rates
TARGET_VS_SINGLES, TARGET_VS_TRL = 2.0, 1.5  # the sweep's command at most 1/x of theirs
RESULTS = "sweep_bench"  # OUT/sweep_bench.json (what was measured), OUT/sweep_bench.md


# -- the three sides ---------------------------------------------------------------------------
def lorafleet_command(args: list[str]) -> float:
    """`lorafleet ARGS` as its own process; its whole time in seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lorafleet.cluster.cli", *args])
    if done.returncode:
        raise RuntimeError(f"`lorafleet {shlex.join(args)}` failed (exit {done.returncode})")
    return time.perf_counter() - start


def run_record(run_dir: RunDir) -> dict:
    """What the tables read of one run: its summary.json and its RL metrics rows."""
    return {"summary": run_dir.read_summary(), "rows": read_metrics(run_dir)}


def run_sweep(config: list[str], seeds: list[int], overrides: list[str], run_dir: Path) -> dict:
    """`lorafleet sweep` of one policy per seed; each policy's record with its seed (read back
    from the config.yaml it wrote)."""
    from ..config import load_train_config

    seconds = lorafleet_command(["sweep", *config, *overrides,
                                 f"seed={','.join(map(str, seeds))}", f"run_dir={run_dir}"])
    root = RunDir(run_dir).read_summary()
    policies = {}
    for name in root["policies"]:
        policy_dir = RunDir(run_dir / name)
        policies[name] = {"seed": load_train_config(policy_dir.config).seed,
                          **run_record(policy_dir)}
    return {"command_seconds": seconds, "summary": root, "policies": policies}


def run_singles(config: list[str], seeds: list[int], overrides: list[str], out: Path
                ) -> list[dict]:
    """`lorafleet train` once per seed, one after the other."""
    runs = []
    for seed in seeds:
        run_dir = out / f"seed={seed}"
        seconds = lorafleet_command(["train", *config, *overrides, f"seed={seed}",
                                     f"run_dir={run_dir}"])
        runs.append({"seed": seed, "command_seconds": seconds, **run_record(RunDir(run_dir))})
    return runs


def trl_shape(path: str | None, overrides: list[str]) -> dict:
    """The job's model (built here, before any side is timed), shape and learner precision, as
    TRL's side takes them; TRL's side trains the default task only."""
    from ...common.tasks.registry import TaskConfig, build_task
    from ..config import load_train_config
    from ..inputs import resolve_model
    from .vs_trl import trl_bf16

    cfg = load_train_config(path, overrides)
    if cfg.task != TaskConfig():
        raise ConfigError("bench sweep: TRL's side trains the default task (addition, "
                          "max_operand 49); leave task.* at its defaults")
    return dict(model=str(resolve_model(cfg, build_task(cfg.task))), steps=cfg.iterations,
                prompts=cfg.prompts_per_iteration, samples=cfg.rollout.samples_per_prompt,
                max_new_tokens=cfg.rollout.max_new_tokens, bf16=trl_bf16(cfg.learner.autocast))


def run_trl_side(shape: dict, seeds: list[int], out: Path) -> list[dict]:
    from .vs_trl import run_trl, trl_spec

    return [{"seed": seed, **run_trl(trl_spec(
        shape["model"], shape["steps"], seed, shape["max_new_tokens"], shape["bf16"],
        out / f"seed={seed}", shape["prompts"], shape["samples"]))} for seed in seeds]


# -- figures (pure: from the records above) ----------------------------------------------------
def steady(samples: list[float], step_seconds: list[float]) -> dict:
    """One run's steps after the warm-up ones (at least its last step)."""
    warmup = min(WARMUP, len(samples) - 1)
    return {"samples": samples[warmup:], "step_seconds": step_seconds[warmup:]}


def step_columns(rows: list[dict]) -> dict:
    """Rows as the per-step samples and step_seconds lists `steady_rate` reads."""
    return {k: [r[k] for r in rows] for k in ("samples", "step_seconds")}


def pooled_rate(runs: list[dict]) -> float:
    """Steady-state samples/s of runs one after the other: `steady_rate` of their steady steps
    pooled."""
    parts = [steady(r["samples"], r["step_seconds"]) for r in runs]
    return steady_rate({k: [x for p in parts for x in p[k]] for k in ("samples", "step_seconds")},
                       warmup=0)


def generate_seconds(row: dict) -> float:
    return row["response_tokens"] / row["rollout_tokens_per_s"]


def sweep_rounds(policies: dict[str, dict]) -> list[dict]:
    """The sweep's rounds (every policy advances one iteration per round), each with its
    samples (all policies'), its time (the longest policy row's step_seconds), the learner's
    seconds (one joint update trains every policy of the round, and each row carries that
    call's time: the longest) and generation's (the
    round's slowest batch from queued to returned: the policies' batches overlap each other
    and the updates, and each waits behind the work queued on the workers before it, so this
    bounds the engines' busy time from above)."""
    by_iteration: dict[int, list[dict]] = defaultdict(list)
    for record in policies.values():
        for row in record["rows"]:
            by_iteration[row["iteration"]].append(row)
    return [{"samples": sum(r["samples"] for r in rows),
             "step_seconds": max(r["step_seconds"] for r in rows),
             "train_seconds": max(r["train_seconds"] for r in rows),
             "generate_seconds": max(generate_seconds(r) for r in rows)}
            for _, rows in sorted(by_iteration.items())]


def side_figures(results: dict) -> dict[str, dict]:
    """Per side (sweep, singles, trl): whole command seconds, samples trained, steady-state
    samples/s, start-up seconds, learner and generation seconds, learner peak MiB (None: not
    measured on that side)."""
    sweep, singles, trl = results["sweep"], results["singles"], results["trl"]
    rounds = sweep_rounds(sweep["policies"])
    single_rows = [row for run in singles for row in run["rows"]]
    return {
        "sweep": dict(
            command_seconds=sweep["command_seconds"],
            samples=sum(r["samples"] for r in rounds),
            steady_rate=pooled_rate([step_columns(rounds)]),
            startup_seconds=sweep["summary"]["startup_seconds"],
            learner_seconds=sum(r["train_seconds"] for r in rounds),
            generate_seconds=sum(r["generate_seconds"] for r in rounds),
            peak_mib=sweep["summary"]["learner_peak_mib"]),
        "singles": dict(
            command_seconds=sum(run["command_seconds"] for run in singles),
            samples=sum(r["samples"] for r in single_rows),
            steady_rate=pooled_rate([step_columns(run["rows"]) for run in singles]),
            startup_seconds=sum(run["summary"]["startup_seconds"] for run in singles),
            learner_seconds=sum(r["train_seconds"] for r in single_rows),
            generate_seconds=sum(generate_seconds(r) for r in single_rows),
            peak_mib=max(run["summary"]["learner_peak_mib"] for run in singles)),
        "trl": dict(
            command_seconds=sum(run["command_seconds"] for run in trl),
            samples=sum(sum(run["samples"]) for run in trl),
            steady_rate=pooled_rate(trl),
            startup_seconds=sum(run["first_step_seconds"] for run in trl),
            learner_seconds=None, generate_seconds=None, peak_mib=None),
    }


def figures_table(figures: dict[str, dict], p: int) -> str:
    """The sides' figures, and the sweep's against each of the other two."""
    sweep, singles, trl = figures["sweep"], figures["singles"], figures["trl"]

    def rate(side: dict) -> float:
        return side["samples"] / side["command_seconds"]

    def share(side: dict, key: str) -> str:
        if side[key] is None:
            return "—"
        return f"{side[key]:.1f} s ({side[key] / side['command_seconds']:.0%})"

    def against(value, other, note: str = "") -> str:
        return "—" if value is None or other is None else ratio(value, other) + note

    rows = [
        ["whole command(s), s", *(f"{s['command_seconds']:.1f}" for s in (sweep, singles, trl)),
         against(sweep["command_seconds"], singles["command_seconds"],
                 f" (target <= {1 / TARGET_VS_SINGLES:.2f}x)"),
         against(sweep["command_seconds"], trl["command_seconds"],
                 f" (target <= {1 / TARGET_VS_TRL:.2f}x)")],
        ["samples trained", *(str(s["samples"]) for s in (sweep, singles, trl)), "", ""],
        ["samples/s, whole command(s)", *(f"{rate(s):.1f}" for s in (sweep, singles, trl)),
         against(rate(sweep), rate(singles)), against(rate(sweep), rate(trl))],
        ["samples/s, steady state", *(f"{s['steady_rate']:.1f}" for s in (sweep, singles, trl)),
         against(sweep["steady_rate"], singles["steady_rate"]),
         against(sweep["steady_rate"], trl["steady_rate"])],
        ["start-up paid (TRL: to its first step)",
         *(share(s, "startup_seconds") for s in (sweep, singles, trl)),
         against(sweep["startup_seconds"], singles["startup_seconds"]),
         against(sweep["startup_seconds"], trl["startup_seconds"])],
        ["learner updates", *(share(s, "learner_seconds") for s in (sweep, singles, trl)),
         against(sweep["learner_seconds"], singles["learner_seconds"]), "—"],
        ["generation", *(share(s, "generate_seconds") for s in (sweep, singles, trl)),
         against(sweep["generate_seconds"], singles["generate_seconds"]), "—"],
        [f"learner peak memory, MiB (P={p} / P=1)",
         *("—" if s["peak_mib"] is None else f"{s['peak_mib']:.0f}" for s in (sweep, singles, trl)),
         against(sweep["peak_mib"], singles["peak_mib"]), "—"],
    ]
    return markdown_table(["figure", f"sweep: {p} policies, one fleet",
                           f"{p} single runs, one after the other", f"{p} TRL GRPO runs",
                           "sweep / singles", "sweep / TRL"], rows)


def greedy_spread(singles: list[dict]) -> tuple[float, float]:
    values = [run["summary"]["final_eval_greedy"] for run in singles]
    return min(values), max(values)


def held_out_table(results: dict) -> str:
    """Each policy's held-out figures after training next to the single run of its seed."""
    singles = {run["seed"]: run["summary"] for run in results["singles"]}

    def figures(summary: dict) -> str:
        if summary.get("final_eval_greedy") is None:  # a stopped policy: no final evaluation
            return "—"
        return f"{summary['final_eval_reward']:.3f} / {summary['final_eval_greedy']:.3f}"

    low, high = greedy_spread(results["singles"])
    rows = [[name, str(record["seed"]), figures(record["summary"]),
             figures(singles[record["seed"]])]
            for name, record in results["sweep"]["policies"].items()]
    rows.append(["single runs' spread (greedy)", "", "", f"{low:.3f}-{high:.3f}"])
    return markdown_table(["policy", "seed", "sweep: held-out sampled / greedy",
                           "single run: held-out sampled / greedy"], rows)


def verdicts(figures: dict[str, dict], results: dict) -> list[str]:
    """One line per target: the figure and whether it is met."""
    sweep = figures["sweep"]["command_seconds"]
    lines = []
    for side, target, label in (("singles", TARGET_VS_SINGLES, "the single runs'"),
                                ("trl", TARGET_VS_TRL, "the TRL runs'")):
        theirs = figures[side]["command_seconds"]
        lines.append(f"sweep command <= 1/{target:g} of {label}: {ratio(sweep, theirs)}: "
                     f"{'met' if sweep * target <= theirs else 'missed'}")
    low, high = greedy_spread(results["singles"])
    greedy = {name: record["summary"].get("final_eval_greedy")  # None: a stopped policy
              for name, record in results["sweep"]["policies"].items()}
    outside = [f"{name} {'stopped' if value is None else value}" for name, value in greedy.items()
               if value is None or not low <= value <= high]
    policies = len(results["sweep"]["policies"])
    lines.append(f"each policy's held-out greedy within the single runs' spread {low:.3f}-"
                 f"{high:.3f}: {policies - len(outside)}/{policies}: "
                 + ("met" if not outside else f"missed ({', '.join(outside)})"))
    return lines


def sweep_report(results: dict) -> str:
    shape, p = results["shape"], len(results["seeds"])
    figures = side_figures(results)
    return "\n".join([
        f"bench sweep: {p} policies (seeds {results['seeds']}) of {results['config']} on one "
        f"fleet vs {p} single runs vs {p} TRL GRPO runs; {shape['steps']} iterations of "
        f"{shape['prompts']} prompts x {shape['samples']} samples x <= "
        f"{shape['max_new_tokens']} new tokens; steady state: iterations after the first "
        f"{WARMUP}; shares: of the side's whole command time",
        results["provenance"], "",
        figures_table(figures, p),
        held_out_table(results),
        *(f"- {line}" for line in verdicts(figures, results)), "",
    ])


# -- the benchmark -------------------------------------------------------------------------------
def bench_sweep(path: str | None, overrides: list[str], seeds: list[int],
                iterations: int | None, out: str, command: str, reprint: bool = False) -> dict:
    """Runs the three sides into a fresh `out` (or, with `reprint`, prints the report of the
    bench saved there)."""
    if reprint:
        results = json.loads((Path(out) / f"{RESULTS}.json").read_text())
        publish(sweep_report(results))
        return results
    if len(seeds) < 2:
        raise ConfigError(f"bench sweep: --seeds {seeds}: at least two seeds (one policy each)")
    overrides = [*overrides, *([f"iterations={iterations}"] if iterations is not None else [])]
    config = [path] if path is not None else []
    shape = trl_shape(path, overrides)
    out_dir = fresh_directory(out).resolve()
    results = {"config": path or "the default job", "seeds": seeds, "shape": shape,
               "provenance": provenance(command)}
    results["sweep"] = run_sweep(config, seeds, overrides, out_dir / "sweep")
    results["singles"] = run_singles(config, seeds, overrides, out_dir / "single")
    results["trl"] = run_trl_side(shape, seeds, out_dir / "trl")
    (out_dir / f"{RESULTS}.json").write_text(json.dumps(results, indent=1))
    publish(sweep_report(results), out_dir / f"{RESULTS}.md", (f"{RESULTS}.json",))
    return results
