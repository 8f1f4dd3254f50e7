"""`lorafleet bench WHAT`: the benchmarks' command line (each bench is its own module here,
imported when it runs)."""

from __future__ import annotations

import argparse

from ..cli_args import int_list, split_config_and_overrides
from .memory import QWEN2_SHAPES, bench_memory
from .memory import add_arguments as add_bench_memory_arguments


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """The `bench` verb on the CLI's subparsers `sub`."""
    bench = sub.add_parser(
        "bench", help="`bench rollout`: the rollout fleet vs raw vLLM; `bench memory`: learner "
        "memory per algorithm; `bench reward`: reward-model scoring, 1 vs 2 reward actors; "
        "`bench demo`: the default job (or CONFIG) over --seeds, start/end figures and spread; "
        "`bench async`: rollout.mode sync vs async over --seeds, and with a slow reward; "
        "`bench vs-trl`: TRL's GRPOTrainer vs lorafleet's GRPO, two scales; `bench sweep`: "
        "one policy per seed on one fleet vs the single runs one after the other vs TRL; "
        "`bench tinker`: the Tinker API (lorafleet serve, the tinker SDK) vs the same calls "
        "in-process, per call and with --clients at once; `bench shape`: a few iterations on "
        "a random-init model of Qwen2.5's shape vs the embedded model (adapter bytes, sync "
        "seconds, peak memory per actor, update time); `bench soak`: the default job in async "
        "mode while rollout and reward actors and once the driver are SIGKILLed, then "
        "resumed and its records checked; `bench learner`: one joint update over N adapters "
        "vs N one-adapter updates vs one adapter alone; `bench startup`: the default job's "
        "start-up on its first run (empty cache) and the next, vs a bare vLLM engine",
    )
    bench.add_argument("what", choices=["rollout", "memory", "reward", "demo", "async", "vs-trl",
                                        "sweep", "tinker", "shape", "soak", "learner",
                                        "startup"])
    bench.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    bench.add_argument("--seeds", help="demo, async, vs-trl, sweep: comma-separated seeds "
                       "(0,1,2; vs-trl 0; sweep 0,1,2,3)")
    bench.add_argument("--out", help="demo, vs-trl, sweep, tinker, shape, soak, learner, "
                       "startup: output directory (runs/demo, runs/vs-trl, runs/bench-sweep, "
                       "runs/bench-tinker, runs/bench-shape, runs/bench-soak, "
                       "runs/bench-learner, runs/bench-startup)")
    bench.add_argument("--shape", default="qwen2.5-0.5b", choices=list(QWEN2_SHAPES),
                       help="shape: the published model shape, built random-init "
                       "(qwen2.5-0.5b)")
    bench.add_argument("--iterations", type=int,
                       help="sweep: iterations of every run on every side (the config's); "
                       "tinker: iterations of each client at once (20); soak: of the run (200)")
    bench.add_argument("--kill-every", type=float, default=20.0,
                       help="soak: seconds between two actor kills (20)")
    bench.add_argument("--no-faults", action="store_true",
                       help="soak: the same job undisturbed (the figures to compare with)")
    bench.add_argument("--overlap", action="store_true",
                       help="soak: kill every --kill-every s even while the last victim is "
                       "being brought back (default: one fault at a time)")
    bench.add_argument("--clients",
                       help="tinker: comma-separated counts of clients at once (1,2,4)")
    bench.add_argument("--calls", type=int,
                       help="tinker: timed calls of each kind, after 5 warm-up ones (30)")
    bench.add_argument("--scales", default="small,large",
                       help="vs-trl: small, default, few (the embedded model; 20 or 40 "
                       "steps of 64 prompts, 30 of 16), large (~27M random-init); learner: "
                       "small, large")
    bench.add_argument("--warm", action="store_true",
                       help="vs-trl: lorafleet's jobs again on a warm fleet (`lorafleet up` "
                       "once per scale, timed apart)")
    bench.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                       help="vs-trl: both learners' bfloat16 autocast (auto: where native)")
    bench.add_argument("--reprint", action="store_true",
                       help="vs-trl, sweep: print the tables of the run saved in --out, run "
                       "nothing")
    add_bench_memory_arguments(bench)
    bench.add_argument("--adapters", default="1,2,4,8",
                       help="learner: comma-separated numbers of adapters in one pass (1,2,4,8)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="learner: timed rounds of each measurement, after a warm-up (3)")
    bench.set_defaults(func=cmd_bench)
    return bench


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "memory":
        bench_memory(args)
        return
    if args.what == "learner":
        import os
        from pathlib import Path

        from .learner import bench_learner

        bench_learner(int_list(args.adapters, "--adapters"), args.scales.split(","),
                      args.repeats, min(2, os.cpu_count() or 1), args.device or "cpu",
                      Path(args.out or "runs/bench-learner"), args.command_line)
        return
    path, overrides = split_config_and_overrides(args.items)
    if args.what == "demo":
        from .demo import bench_demo

        bench_demo(path, int_list(args.seeds or "0,1,2", "--seeds"), overrides,
                   args.out or "runs/demo", args.command_line)
        return
    if args.what == "vs-trl":
        from .vs_trl import bench_vs_trl

        bench_vs_trl(path, overrides, args.scales.split(","),
                     int_list(args.seeds or "0", "--seeds"), args.autocast,
                     args.out or "runs/vs-trl", args.command_line, args.reprint, args.warm)
        return
    if args.what == "sweep":
        from .sweep import bench_sweep

        bench_sweep(path, overrides, int_list(args.seeds or "0,1,2,3", "--seeds"),
                    args.iterations, args.out or "runs/bench-sweep", args.command_line,
                    args.reprint)
        return
    if args.what == "async":
        from .async_mode import bench_async

        bench_async(path, overrides, int_list(args.seeds or "0,1,2", "--seeds"),
                    args.command_line)
        return
    if args.what == "tinker":
        from .tinker import bench_tinker

        clients = None if args.clients is None else int_list(args.clients, "--clients")
        bench_tinker(path, overrides, args.out or "runs/bench-tinker", clients, args.calls,
                     args.iterations, args.command_line)
        return
    if args.what == "soak":
        from .soak import bench_soak

        bench_soak(path, overrides, args.iterations or 200, args.kill_every, not args.no_faults,
                   args.overlap, args.out or "runs/bench-soak", args.command_line)
        return
    if args.what == "shape":
        from .shape import bench_shape

        bench_shape(path, overrides, args.shape, args.out or "runs/bench-shape",
                    args.command_line)
        return
    if args.what == "startup":
        from .startup import bench_startup

        bench_startup(path, overrides, args.out or "runs/bench-startup", args.command_line)
        return
    if args.what == "reward":
        from .reward import bench_reward

        bench_reward(path, overrides, args.command_line)
        return
    from .rollout import bench_rollout

    bench_rollout(path, overrides, args.command_line)
