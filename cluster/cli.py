"""`lorafleet` command line: train, sweep, serve, up, down, train-rm, compare, bench,
build-model, make-data, validate, tasks, eval, nlu-table, meet-table, config-reference."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..common.configio import ConfigError
from ..common.corpora import DatasetError
from ..common.logs import apply_log_level
from .actor_group import PlacementError
from .bench.cli import add_bench_parser
from .checkpoint import ResumeError
from .cli_args import int_list, split_config_and_overrides


def cmd_train(args: argparse.Namespace) -> None:
    from ..common.run_dir import RunDir
    from .config import load_train_config
    from .trainer import Trainer

    path, overrides = split_config_and_overrides(args.items)
    if args.resume is None:
        cfg = load_train_config(path, overrides)
    elif path is not None:
        raise ConfigError("--resume RUN_DIR takes the run's own config.yaml; give only "
                          "key=value overrides (e.g. ray.address=...)")
    else:
        run_dir = RunDir(args.resume)
        if not run_dir.config.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; not a run directory")
        cfg = load_train_config(run_dir.config, [*overrides, f"run_dir={run_dir}"])
    with Trainer(cfg, resume=args.resume is not None) as trainer:
        trainer.run()


def cmd_serve(args: argparse.Namespace) -> None:
    from .tinker.config import load_serve_config
    from .tinker.server import serve

    path, overrides = split_config_and_overrides(args.items)
    serve(load_serve_config(path, overrides))


def cmd_sweep(args: argparse.Namespace) -> None:
    import yaml

    from .config import load_train_config
    from .policies import sweep_policies
    from .trainer import Trainer

    path, assignments = split_config_and_overrides(args.items)
    policies, overrides = sweep_policies(assignments)
    if not policies:
        raise ConfigError("sweep: give at least one key=a,b,... to sweep over (e.g. seed=0,1,2)")
    swept = yaml.safe_dump(policies, default_flow_style=True, width=10**6).strip()
    cfg = load_train_config(path, [*overrides, f"policies={swept}"])
    print(f"sweep: {len(policies)} policies on one fleet: "
          f"{', '.join(p['name'] for p in policies)}")
    with Trainer(cfg) as trainer:
        trainer.run()


def cmd_up(args: argparse.Namespace) -> None:
    from ..common.startup import StartupClock
    from . import warm
    from .config import load_train_config

    clock = StartupClock()
    path, overrides = split_config_and_overrides(args.items)
    if args.serve:
        from .tinker.config import load_serve_config
        from .tinker.server import serve_specs

        if args.adapters is not None:
            raise ConfigError("--adapters: a server's engines hold rollout.max_loras adapters "
                              "each; give rollout.max_loras=N instead")
        cfg, _, learner, engine = serve_specs(load_serve_config(path, overrides))
        own_engine, jobs = None, "`lorafleet serve` with the same fleet keys runs"
    else:
        cfg = load_train_config(path, overrides)
        learner, engine, own_engine = warm.job_specs(cfg, args.adapters or 4)
        jobs = (f"`lorafleet train`, `sweep` (up to {engine.max_loras} policies) and jobs of "
                "the same model and shape run")
    state = warm.start(cfg, learner, engine, own_engine, args.command_line)
    clock.lap("warm fleet")
    print(f"warm fleet up at {state.address} in {sum(clock.phases.values()):.0f} s (dashboard "
          f"{state.dashboard}): learner and {len(state.actors['rollout'])} more rollout "
          f"worker(s) for {state.engine['model_path']}. {jobs} on it; `lorafleet down` stops "
          "it", flush=True)


def cmd_down(args: argparse.Namespace) -> None:
    from . import warm

    state = warm.stop()
    print("no warm fleet is up" if state is None
          else f"warm fleet at {state.address} stopped", flush=True)


def cmd_train_rm(args: argparse.Namespace) -> None:
    from .train_rm import train_reward_model

    train_reward_model(*split_config_and_overrides(args.items))


def cmd_compare(args: argparse.Namespace) -> None:
    from .bench.compare import compare

    configs = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    compare(configs, int_list(args.seeds, "--seeds"), overrides, args.out, args.command_line)


def cmd_build_model(args: argparse.Namespace) -> None:
    from ..common.config import TINY
    from ..common.tasks.registry import build_task
    from ..common.tiny_model import build_tiny_model, ship_tiny_model
    from .config import load_train_config

    path, overrides = split_config_and_overrides(args.items)
    cfg = load_train_config(path, overrides)
    if cfg.model.name_or_path != TINY:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: build-model builds "
                          "the embedded tiny model (model.name_or_path=tiny)")
    build = ship_tiny_model if args.ship else build_tiny_model
    print(f"model: {build(build_task(cfg.task).model_recipe, cfg.model.tiny)}")


def cmd_make_data(args: argparse.Namespace) -> None:
    from ..common.corpora import write_jsonl
    from ..common.tasks.base import sft_rows
    from ..common.tasks.registry import build_task
    from .config import load_train_config

    if (args.rows, args.seed) != (None, None) and args.kind != "word-problems":
        raise ConfigError("make-data: --rows and --seed are for word-problems only")
    if args.kind == "sentiment":
        from ..common.tasks.vader import write_sst2_layout

        for written in write_sst2_layout(Path(args.out)):
            print(f"wrote {written} ({len(written.read_text().splitlines()) - 1} rows)")
        return
    if args.kind == "word-problems":
        from ..common.tasks.word_problems import ROWS, SEED, word_problem_rows

        rows = word_problem_rows(ROWS if args.rows is None else args.rows, args.seed or SEED)
        print(f"wrote {len(rows)} word problems to {write_jsonl(rows, Path(args.out))}")
        return
    path, overrides = split_config_and_overrides(args.items)
    task = build_task(load_train_config(path, overrides).task)
    if args.kind == "sft":
        rows = sft_rows(task.examples(args.split))
    else:
        rows = task.preference_rows(args.split)
    print(f"wrote {len(rows)} {args.kind} rows to {write_jsonl(rows, Path(args.out))}")


def cmd_tasks(args: argparse.Namespace) -> None:
    from ..common.tasks.registry import TASKS

    print("| task.name | hub dataset (config) [held-out split] | local file layout | label words "
          "| metrics |\n| --- | --- | --- | --- | --- |")
    for name, entry in TASKS.items():
        print(f"| {name} | {' | '.join(entry.row)} |")


def cmd_eval(args: argparse.Namespace) -> None:
    from .bench.model_eval import run_eval
    from .config import load_train_config

    path, overrides = split_config_and_overrides(args.items)
    run_eval(load_train_config(path, overrides), int_list(args.shots, "--shots"), args.adapter,
             args.command_line)


def cmd_nlu_table(args: argparse.Namespace) -> None:
    from .bench.nlu_table import nlu_table
    from .config import load_train_config

    path, overrides = split_config_and_overrides(args.items)
    nlu_table(load_train_config(path, overrides), args.shots, args.command_line)


def cmd_meet_table(args: argparse.Namespace) -> None:
    from .bench.meet_table import meet_table
    from .config import load_train_config

    path, overrides = split_config_and_overrides(args.items)
    seeds = None if args.seeds is None else int_list(args.seeds, "--seeds")
    meet_table(load_train_config(path, overrides), seeds, args.command_line)


def cmd_config_reference(args: argparse.Namespace) -> None:
    from .config_reference import write_reference

    current = write_reference(Path(args.out), check=args.check)
    if args.check and not current:
        sys.exit(f"{args.out} is out of date: run `lorafleet config-reference`")
    print(f"{args.out}: {'up to date' if current else 'written'}")


def cmd_validate(args: argparse.Namespace) -> None:
    from .validate import validate

    if not validate(args.paths, args.train_config):
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet", description="RL fine-tuning of language models with LoRA on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="run a training job (default: the embedded tiny-model PPO job)"
    )
    train.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    train.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue RUN_DIR from its last complete checkpoint (same data order)",
    )
    train.set_defaults(func=cmd_train)
    sweep = sub.add_parser(
        "sweep", help="train every combination of the swept values as policies of one run on "
        "one fleet (key=a,b,c; several keys: all combinations), e.g. `lorafleet sweep "
        "seed=0,1,2,3`; each policy writes RUN_DIR/<name>/, RUN_DIR/policies.md compares them",
    )
    sweep.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value | key=a,b,...")
    sweep.set_defaults(func=cmd_sweep)
    srv = sub.add_parser(
        "serve", help="serve the Tinker API (the `tinker` SDK's ServiceClient) on the fleet: "
        "each training client an adapter on the learner's base model, each sampling client "
        "served by every rollout worker (docs/tinker.md); binds 127.0.0.1:8000 by default",
    )
    srv.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    srv.set_defaults(func=cmd_serve)
    up = sub.add_parser(
        "up", help="start a warm fleet (Ray, the learner with its base model, the engines) "
        "that later train and sweep jobs of the same model run on, without their start-up "
        "(with --serve: the fleet for `lorafleet serve`)")
    up.add_argument("items", nargs="*", help="a job's config.yaml and/or key=value overrides: "
                    "the fleet is the one that job would start")
    up.add_argument("--adapters", type=int, default=None,
                    help="adapters each engine serves at once (a sweep's policies; default 4)")
    up.add_argument("--serve", action="store_true",
                    help="the fleet `lorafleet serve` with these items would start, for it")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the warm fleet `lorafleet up` started")
    down.set_defaults(func=cmd_down)
    train_rm = sub.add_parser(
        "train-rm", help="train a LoRA reward model (Bradley-Terry on preference pairs, section "
        "rm) and save it for reward.model=DIR",
    )
    train_rm.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    train_rm.set_defaults(func=cmd_train_rm)
    bench = add_bench_parser(sub)
    comp = sub.add_parser(
        "compare", help="run several algorithm configs over seeds; plot reward vs samples"
    )
    comp.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml | key=value",
        help="configs to compare (default: deploy/configs/{default,grpo,rloo,spr}.yaml); "
        "overrides apply to all",
    )
    comp.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    comp.add_argument("--out", default="runs/compare", help="output directory")
    comp.set_defaults(func=cmd_compare)
    build = sub.add_parser(
        "build-model", help="build the config's embedded tiny model (task + model.tiny) and "
        "print its directory; --ship stores a fresh build as package data",
    )
    build.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    build.add_argument("--ship", action="store_true",
                       help="build afresh into common/models/ (what every machine then loads)")
    build.set_defaults(func=cmd_build_model)
    data = sub.add_parser(
        "make-data", help="write the task's SFT pairs or preference pairs as JSONL (the format "
        "the sft / dpo stages read)",
    )
    data.add_argument("kind", choices=["sft", "preferences", "sentiment", "word-problems"],
                      help="sentiment: the VADER-labelled set in SST-2's layout (OUT/SST-2/); "
                      "word-problems: chat-format arithmetic word problems with an answer "
                      "column (deploy/data/word_problems.jsonl is the default one)")
    data.add_argument("out", help="output .jsonl path (sentiment: a directory)")
    data.add_argument("--split", default="train", choices=["train", "eval"])
    data.add_argument("--rows", type=int, help="word-problems: rows (3000)")
    data.add_argument("--seed", type=int, help="word-problems: generator seed (0)")
    data.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                      help="the task comes from this config (default: the default task)")
    data.set_defaults(func=cmd_make_data)
    tasks = sub.add_parser("tasks", help="list the NLU tasks (template, labels, metrics, data)")
    tasks.set_defaults(func=cmd_tasks)
    ev = sub.add_parser(
        "eval", help="zero-/k-shot held-out metrics of a model (+ adapter) on the config's NLU "
        "task(s): eval.md + eval.json in run_dir",
    )
    ev.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    ev.add_argument("--shots", default="0,4", help="in-context examples per setting (0,4)")
    ev.add_argument("--adapter", help="a PEFT adapter directory, e.g. runs/x/adapter")
    ev.set_defaults(func=cmd_eval)
    table = sub.add_parser(
        "nlu-table", help="zero-shot / k-shot / each stage of the config's chain (e.g. SFT, "
        "SFT+PPO) per task: table.md, table.json, table.png",
    )
    table.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    table.add_argument("--shots", type=int, default=4, help="k of the k-shot row (4)")
    table.set_defaults(func=cmd_nlu_table)
    meet = sub.add_parser(
        "meet-table", help="MEET (LoRA and soft-prompt controls) against SFT (best level), "
        "Chain of Hindsight, DPO, its stage ablations and MEET-DPO on the meet stage's data: "
        "table.md, table.json, table.png",
    )
    meet.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    meet.add_argument("--seeds", help="comma-separated seeds: a table per seed (RUN_DIR/seedS) "
                      "and one over them, with each MEET variant's min/max margin over each "
                      "baseline (default: the config's seed alone)")
    meet.set_defaults(func=cmd_meet_table)
    check = sub.add_parser(
        "validate", help="check `ray up` cluster YAMLs (Ray's validator) and KubeRay RayJob "
        "manifests, and with --train-config that the run's resource asks fit them",
    )
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.add_argument(
        "--train-config", metavar="CONFIG.yaml", help="also check that this run config's "
        "resource asks (learner, rollout, reward; placement.strategy) fit the node types")
    check.set_defaults(func=cmd_validate)
    ref = sub.add_parser("config-reference", help="write the configuration reference "
                         "(docs/configuration.md) from the config dataclasses")
    ref.add_argument("--out", default="docs/configuration.md", help="output path")
    ref.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 if --out differs from what would be written")
    ref.set_defaults(func=cmd_config_reference)
    for command in (train, sweep, up, train_rm, bench, comp, ev, table):  # those that load models
        command.add_argument(
            "--verbose", action="store_true", help="show the warnings of vLLM, Ray, transformers "
            "(LORAFLEET_LOG_LEVEL=WARNING; default ERROR: their errors only; INFO, DEBUG: more)",
        )
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may also follow the options (`bench demo --seeds 0 learner.threads=1`), which
    argparse leaves over once an option has ended the positional list. `command_line`: the
    command as typed (the benchmarks' tables name it)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    args.command_line = shlex.join(["lorafleet", *argv])
    if rest and (not hasattr(args, "items") or any("=" not in r for r in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.items += rest
    return args


def one_line_error(exc: Exception) -> tuple[str, int] | None:
    """What the user reads instead of a traceback, and the exit status, for an error whose
    message says all they need: bad input (2), or a run stopped for the reason it names (1).
    None: a bug, shown with its traceback."""
    from ..reward.pool import RewardError
    from .trainer import LearnerDied
    from .warm import WarmFleetError

    kinds = ((ConfigError, "config error", 2), (ResumeError, "cannot resume", 2),
             (DatasetError, "dataset error", 2), (PlacementError, "resources", 2),
             (RewardError, "reward error", 1), (LearnerDied, "run stopped", 1),
             (WarmFleetError, "warm fleet", 1))
    for kind, label, status in kinds:
        if isinstance(exc, kind):
            # an error raised in an actor arrives wrapped, its remote traceback in the text
            cause = getattr(exc, "cause", None)
            return f"lorafleet: {label}: {cause if isinstance(cause, kind) else exc}", status
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        apply_log_level(getattr(args, "verbose", False))
        args.func(args)
    except Exception as exc:
        known = one_line_error(exc)
        if known is None:
            raise
        print(known[0], file=sys.stderr)
        sys.exit(known[1])

if __name__ == "__main__":
    main()
