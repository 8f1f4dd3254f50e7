"""`lorafleet bench vs-trl`: TRL's GRPOTrainer against lorafleet's GRPO on this machine, in one
run, at several shapes (SCALES): the embedded model with the default answer length at 64
prompts x 4 samples for 20 steps (small), for the default job's 40 (default), and at 16 x 4
(few: where a step's fixed costs count most), and a ~27M-parameter random-init Llama (the
embedded recipe at a larger shape, no warm start) with 64-token responses (large).

Both sides train the same model on the same task prompts with the same reward function and
batch shape, LoRA r8 on every projection, AdamW at a constant lr 1e-3, grad-norm
clip 1.0, clip eps 0.2, the k3 KL to the adapter-off reference in the loss (coefficient 0.02,
TRL's beta), one epoch of one minibatch per step, a token-mean loss (TRL's loss_type "dapo"),
and the same learner precision (`--autocast`: lorafleet's learner.autocast; TRL's bf16 flag,
accelerate's CPU autocast). TRL runs in a subprocess from its own install (pip --target in the
cache, --no-deps on top of this environment: its pins would pull another torch and vLLM).

lorafleet runs each job with a fleet of its own (ray.warm_fleet=off) and, with `warm`, again on
a warm fleet `lorafleet up` started for the scale (its own time reported apart): the whole
command of a user's repeated jobs.

Prints per scale: samples/s in steady state, whole-command time, command -> first step, the
reward-per-sample curves, the learner's achieved GFLOP/s (an update on a batch of the scale's
shape, FLOPs counted by torch) next to this machine's measured float32 and bfloat16 matmul
peaks. Nothing is asserted; TRL is not a dependency and CI does not run this.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...common.cache import cache_root
from ...common.devices import attention_kernel, native_bf16
from ...common.run_dir import RunDir
from ...common.startup import phases_text

TRL_VERSION = "1.16.0"
LR, KL_COEF, CLIP_EPS = 1e-3, 0.02, 0.2
LORA = dict(rank=8, alpha=16.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class Scale:
    max_new_tokens: int
    steps: int
    warmup: int  # first steps left out of the steady-state rate (engine and allocator warm-up)
    prompts: int = 64  # per step
    samples: int = 4  # per prompt
    model_overrides: tuple[str, ...] = ()  # model.tiny.* keys: the embedded recipe's shape
    # learner.compile: worth its minutes of compiling where the update is large
    compile: bool = False


SCALES = {
    "small": Scale(max_new_tokens=6, steps=20, warmup=2),
    "default": Scale(max_new_tokens=6, steps=40, warmup=2),  # the default job's shape
    "few": Scale(max_new_tokens=6, steps=30, warmup=2, prompts=16),
    "large": Scale(max_new_tokens=64, steps=5, warmup=2, model_overrides=(
        "model.tiny.hidden_size=512", "model.tiny.num_layers=8", "model.tiny.num_heads=8",
        "model.tiny.intermediate_size=1536", "model.tiny.sft_steps=0"), compile=True),
}


def lorafleet_overrides(scale: Scale, seed: int, autocast: str, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"seed={seed}", f"iterations={scale.steps}",
        f"prompts_per_iteration={scale.prompts}", "eval_every=0", "checkpoint_every=0",
        f"rollout.samples_per_prompt={scale.samples}",
        f"rollout.max_new_tokens={scale.max_new_tokens}", "algo.name=grpo", "algo.epochs=1",
        f"algo.minibatch_size={scale.prompts * scale.samples}",
        f"algo.policy_lr={LR}", f"algo.kl_coef={KL_COEF}", "algo.kl_mode=loss",
        f"algo.clip_eps={CLIP_EPS}", f"lora.rank={LORA['rank']}", f"lora.alpha={LORA['alpha']}",
        f"learner.autocast={autocast}", f"learner.compile={str(scale.compile).lower()}",
        *scale.model_overrides,
    ]


def cpu_seconds() -> tuple[float, float]:
    """The machine's CPU seconds so far, (user, kernel): every process's, Ray's included."""
    import psutil

    times = psutil.cpu_times()
    return times.user + times.nice, times.system


def kernel_share(before: tuple[float, float]) -> float:
    """The kernel's share of the CPU time spent since `before` (cpu_seconds): thread
    contention (spinning, futex waits, context switches) shows up there."""
    user, kernel = (now - then for now, then in zip(cpu_seconds(), before, strict=True))
    return kernel / (user + kernel)


# -- lorafleet ---------------------------------------------------------------------------------
def lorafleet_command(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorafleet.cluster.cli", *args], env=env)


def run_lorafleet(overrides: list[str], run_dir: Path, env: dict | None = None) -> dict:
    """`lorafleet train` as its own process (`env`: its environment, e.g. the warm fleet's
    directory): whole-command time, command -> first iteration (when its metrics row appears,
    less the iteration's own seconds), steady rows, the kernel's share of the machine's CPU
    time."""
    start, cpu = time.perf_counter(), cpu_seconds()
    proc = lorafleet_command("train", *overrides, env=env)
    first_row_at = None
    while proc.poll() is None:
        if first_row_at is None and RunDir(run_dir).metrics.exists():
            first_row_at = time.perf_counter() - start
        time.sleep(0.2)
    seconds, kernel = time.perf_counter() - start, kernel_share(cpu)
    if proc.returncode:
        raise RuntimeError(f"lorafleet train failed (exit {proc.returncode}): {overrides}")
    from ...common.metrics import read_metrics

    rows = read_metrics(RunDir(run_dir))
    summary = RunDir(run_dir).read_summary()
    return dict(
        command_seconds=seconds, first_step_seconds=first_row_at - rows[0]["step_seconds"],
        kernel_share=kernel, placement=summary["placement"],
        startup_phases=summary["startup_phases"], startup_seconds=summary["startup_seconds"],
        start_eval_seconds=summary["start_eval_seconds"],
        step_seconds=[r["step_seconds"] for r in rows], samples=[r["samples"] for r in rows],
        reward=[r["reward_mean"] for r in rows],
        train_seconds=[r["train_seconds"] for r in rows],
        generate_tokens_per_s=[r["rollout_tokens_per_s"] for r in rows],
    )


def run_on_warm_fleet(runs: list[dict], keys: list[list[str]], directory: Path) -> float:
    """Each run's lorafleet job again, on a warm fleet `lorafleet up` starts for them in
    `directory` (stopped after); each run gets its "lorafleet_warm" side. Returns the seconds
    `lorafleet up` took."""
    env = {**os.environ, "LORAFLEET_WARM_DIR": str(directory)}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    if lorafleet_command("up", *keys[0], env=env).wait():
        raise RuntimeError(f"lorafleet up failed: {keys[0]}")
    up_seconds = time.perf_counter() - start
    try:
        for run, overrides in zip(runs, keys, strict=True):
            run_dir = directory / f"seed{run['seed']}"
            run["lorafleet_warm"] = run_lorafleet([*overrides, f"run_dir={run_dir}"], run_dir,
                                                  env)
    finally:
        lorafleet_command("down", env=env).wait()
    return up_seconds


# -- TRL -----------------------------------------------------------------------------------------
def trl_target() -> Path:
    """TRL installed once into the cache, without its dependencies (see the module doc)."""
    target = cache_root() / f"trl-{TRL_VERSION}"
    if not (target / "trl").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), f"trl=={TRL_VERSION}"], check=True)
    return target


def trl_spec(model_path: str, steps: int, seed: int, max_new_tokens: int, bf16: bool,
             output_dir: Path, prompts: int, samples: int) -> dict:
    """One TRL run with the shared settings (the module doc) at this shape, on every core, with
    the learner's attention kernel (eager on the CPU: common/devices.py)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    return dict(model=model_path, steps=steps, seed=seed, bf16=bf16,
                threads=os.cpu_count() or 1, max_new_tokens=max_new_tokens,
                output_dir=str(output_dir), attention=attention_kernel(None, "cpu"),
                prompts=prompts, samples=samples)


def trl_bf16(autocast: str) -> bool:
    """TRL's bf16 flag for the learner's `learner.autocast` (auto: where the CPU has it)."""
    return autocast == "bf16" or (autocast == "auto" and native_bf16("cpu"))


def run_trl(spec: dict) -> dict:
    """TRL's side in a subprocess (`python -m lorafleet.cluster.bench.vs_trl SPEC_JSON`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(trl_target()), env.get("PYTHONPATH")) if p)
    start, cpu = time.perf_counter(), cpu_seconds()
    out = Path(spec["output_dir"]) / "trl_result.json"
    spec = spec | {"launched_at": time.time()}  # wall clock: read in the other process
    subprocess.run([sys.executable, "-m", "lorafleet.cluster.bench.vs_trl", json.dumps(spec)],
                   env=env, check=True)
    result = json.loads(out.read_text())
    return result | {"command_seconds": time.perf_counter() - start,
                     "kernel_share": kernel_share(cpu)}


def trl_main(spec: dict) -> None:
    """Runs in TRL's process: GRPOTrainer with the shared settings, timed per step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ...common.tasks.registry import TaskConfig, build_task
    from ...reward.registry import get_reward_fn

    torch.set_num_threads(spec["threads"])
    task = TaskConfig()
    examples = build_task(task).examples("train")
    dataset = Dataset.from_list([{"prompt": e.prompt, **e.reward_columns()} for e in examples])
    step_ends, rewards = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    args = GRPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["steps"], seed=spec["seed"],
        model_init_kwargs={"attn_implementation": spec["attention"]},
        per_device_train_batch_size=spec["prompts"] * spec["samples"],
        num_generations=spec["samples"],
        max_completion_length=spec["max_new_tokens"], temperature=1.0,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        beta=KL_COEF, epsilon=CLIP_EPS, num_iterations=1, loss_type="dapo",
        use_cpu=True, bf16=spec["bf16"], logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=get_reward_fn(task.reward_fn),
                          args=args, train_dataset=dataset, peft_config=peft_config,
                          callbacks=[Clock()])
    first_step_seconds = time.time() - spec["launched_at"]
    train_start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([train_start, *step_ends], step_ends, strict=False)]
    result = dict(step_seconds=steps, samples=[spec["prompts"] * spec["samples"]] * len(steps),
                  reward=rewards, first_step_seconds=first_step_seconds)
    (Path(spec["output_dir"]) / "trl_result.json").write_text(json.dumps(result))


# -- the learner's FLOP rate and the machine's matmul peak ------------------------------------
def matmul_gflops(dtype: str, threads: int, n: int = 2048, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def learner_gflops(cfg, model_path: str, scale: Scale, attention: str, autocast: str,
                   steps: int = 3) -> dict:
    """One GRPO update as the run's learner makes it (same config, threads, learner.compile;
    the `attention` kernel) in `autocast` on a batch of the scale's shape: torch's FLOP count of
    the update (run eagerly: a compiled graph's kernels are not counted) over its median time,
    after two warm-up updates (compiling)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ...common.data import pad_token_id
    from ...common.specs import LearnerSpec, PolicySpec
    from ...common.tiny_model import load_tokenizer
    from ...learner.actor import Learner, train_one
    from .memory import BenchSetup, random_scored_batch

    tokenizer = load_tokenizer(model_path)
    learner = Learner(LearnerSpec(
        model_path, pad_token_id(tokenizer), (PolicySpec(algo=cfg.algo, lora=cfg.lora),),
        dtype=cfg.model.dtype, threads=cfg.learner.threads, autocast=autocast,
        attn_implementation=attention, compile=cfg.learner.compile,
    ))
    setup = BenchSetup(prompts=scale.prompts, samples=scale.samples, prompt_tokens=6,
                       response_tokens=scale.max_new_tokens)
    params = sum(p.numel() for p in learner.net.model.get_base_model().parameters())

    def update() -> float:
        batch = random_scored_batch(setup, learner.version, len(tokenizer))
        start = time.perf_counter()
        train_one(learner, batch)
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        update()
    update(), update()
    seconds = statistics.median(update() for _ in range(steps))
    flops = counter.get_total_flops()
    return dict(params=params, gflop=flops / 1e9, seconds=seconds, gflops=flops / seconds / 1e9,
                autocast=learner.core.autocast_dtype or "float32")


# -- the benchmark -------------------------------------------------------------------------------
def bench_vs_trl(path: str | None, overrides: list[str], scales: list[str], seeds: list[int],
                 autocast: str, out: str, command: str, reprint: bool = False,
                 warm: bool = False) -> dict:
    """Runs the benchmark into `out`; `warm`: lorafleet's jobs again on a warm fleet;
    `reprint`: prints the tables of the run saved there (with the command, commit and CPU they
    came from)."""
    from ...common.tasks.registry import build_task
    from ..config import load_train_config
    from ..inputs import resolve_model
    from .harness import provenance

    out_dir = Path(out).resolve()
    if reprint:
        results = json.loads((out_dir / "vs_trl.json").read_text())
        for name, scale in results["scales"].items():
            print_scale(name, Scale(**scale["scale"]), scale["runs"], scale["learner"], results,
                        scale.get("warm_up_seconds"))
        return results
    bf16 = trl_bf16(autocast)
    autocast = "bf16" if bf16 else "off"  # both sides alike
    # both sides use the learner's attention kernel (eager on the CPU: common/devices.py)
    attention = attention_kernel(None, "cpu")
    results: dict = {"autocast": autocast, "attention": attention, "seeds": seeds, "scales": {},
                     "provenance": provenance(command)}
    threads = os.cpu_count() or 1
    results["peak_gflops"] = {d: matmul_gflops(d, threads) for d in ("float32", "bfloat16")}
    for name in scales:
        scale = SCALES[name]
        runs, keys = [], []
        for seed in seeds:
            run_dir = out_dir / f"lorafleet-{name}-seed{seed}"
            keys.append(lorafleet_overrides(scale, seed, autocast, run_dir) + list(overrides))
            cfg = load_train_config(path, keys[-1])
            # builds the large model once, before timing
            model_path = str(resolve_model(cfg, build_task(cfg.task)))
            theirs = run_trl(trl_spec(model_path, scale.steps, seed, scale.max_new_tokens, bf16,
                                      out_dir / f"trl-{name}-seed{seed}", scale.prompts,
                                      scale.samples))
            ours = run_lorafleet([*keys[-1], "ray.warm_fleet=off"], run_dir)
            runs.append({"seed": seed, "lorafleet": ours, "trl": theirs})
        up_seconds = run_on_warm_fleet(runs, keys, out_dir / f"warm-{name}") if warm else None
        # the learner in each precision, side by side
        learner = {precision: learner_gflops(cfg, model_path, scale, attention, setting)
                   for precision, setting in (("bfloat16", "bf16"), ("float32", "off"))}
        results["scales"][name] = {"scale": asdict(scale), "runs": runs, "learner": learner,
                                   "warm_up_seconds": up_seconds}
        print_scale(name, scale, runs, learner, results, up_seconds)
    (out_dir / "vs_trl.json").write_text(json.dumps(results, indent=1))
    return results


def steady_rate(side: dict, warmup: int) -> float:
    """Samples per second of the median step after the warm-up ones (a median: one step slowed
    by another process on a shared machine does not count)."""
    return statistics.median(side["samples"][warmup:]) / statistics.median(
        side["step_seconds"][warmup:])


def print_scale(name: str, scale: Scale, runs: list[dict], learner: dict, results: dict,
                up_seconds: float | None) -> None:
    def figures(key, side):
        return [run[side][key] if key in run[side] else steady_rate(run[side], scale.warmup)
                for run in runs]

    def spread(values) -> str:
        return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    peak = results["peak_gflops"]
    params = learner["bfloat16"]["params"]
    print(f"\nvs TRL {TRL_VERSION}, {name} scale: {params / 1e6:.1f}M-param model, "
          f"{scale.prompts} prompts x {scale.samples} samples x <= {scale.max_new_tokens} new "
          "tokens, "
          f"{scale.steps} steps, learner autocast {results['autocast']}, "
          f"{results['attention']} attention on both sides, seeds {results['seeds']}")
    print(results.get("provenance", "command, commit and CPU not recorded"))
    print(f"  {'':34}{'TRL':>14}{'lorafleet':>14}{'ratio':>10}")
    sides = [("", "lorafleet")] + ([(", warm fleet", "lorafleet_warm")] if up_seconds else [])
    for (suffix, side), (label, key) in itertools.product(sides, (
            ("samples/s (steady)", "rate"), ("whole command (s)", "command_seconds"),
            ("command -> first step (s)", "first_step_seconds"))):
        trl, ours = figures(key, "trl"), figures(key, side)
        ratio = statistics.mean(ours) / statistics.mean(trl)
        ratio = ratio if key == "rate" else 1 / ratio  # > 1: lorafleet better
        print(f"  {label + suffix:34}{spread(trl):>14}{spread(ours):>14}{ratio:>9.2f}x")
    if up_seconds:
        print(f"  the warm fleet's `lorafleet up`: {up_seconds:.1f} s, once for the scale's "
              f"{len(runs)} job(s)")
    trl, ours = figures("kernel_share", "trl"), figures("kernel_share", "lorafleet")
    print(f"  {'kernel share of the CPU time':34}{spread([100 * x for x in trl]) + '%':>14}"
          f"{spread([100 * x for x in ours]) + '%':>14}")
    print(f"  lorafleet placement: {runs[0]['lorafleet']['placement']}")
    for run in runs:
        for suffix, side in sides:
            print(f"  lorafleet{suffix} seed {run['seed']} start-up: "
                  f"{phases_text(run[side]['startup_phases'])}; then the start evaluation "
                  f"{run[side]['start_eval_seconds']:.1f} s")
    for run in runs:
        for side in ("trl", "lorafleet", *(side for _, side in sides[1:])):
            curve = " ".join(f"{r:.2f}" for r in run[side]["reward"])
            print(f"  reward per sample, {side:9} seed {run['seed']}: {curve}")
    compiled = "compiled" if scale.compile else "eager"
    for precision, update in learner.items():
        print(f"  learner update, {precision} ({compiled}): {update['gflop']:.0f} GFLOP in "
              f"{update['seconds']:.2f} s = {update['gflops']:.0f} GFLOP/s, "
              f"{update['gflops'] / peak[precision]:.0%} of this machine's {precision} matmul "
              f"peak ({peak[precision]:.0f} GFLOP/s)")


if __name__ == "__main__":
    trl_main(json.loads(sys.argv[1]))
