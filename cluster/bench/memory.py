"""`lorafleet bench memory`: peak learner memory and update speed per algorithm, on one model and
one batch, each variant in a fresh process (so one peak cannot hide another). Every variant is
the learner's own update (`Learner.train_step`, `sft_step`, `dpo_step` on a synthetic batch);
full-parameter PPO runs the learner's RL updater on three full model copies.

Peak memory is the process's peak RSS since its imports on CPU (Linux's VmHWM, restarted after
them; `torch.cuda.max_memory_allocated` on GPU); the "own" column subtracts the RSS after
imports (nothing on GPU), i.e. what the model, the optimiser and the update itself cost. Speed
is the batch's tokens (prompt + response, every row) over the median update time. Runs without
Ray or vLLM:
`python -m lorafleet.cluster.bench.memory --device cuda --model qwen2.5-1.5b`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# ppo_lora_rm: PPO whose learner also holds the reward adapter and scores its batch with it
# (PERL's one base); rm_actor: what a reward actor with its own base copy costs instead.
VARIANTS = ["sft_lora", "spr", "grpo", "dpo", "ppo_lora", "ppo_lora_rm", "rm_actor", "ppo_full"]
# Qwen2.5's published shapes (their config.json), built random-init: no download.
QWEN2_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
}
MODELS = ["tiny", "llama-100m", *QWEN2_SHAPES]
PAD = 0
# What changes when the learner runs on a GPU: bf16 weights, the longer rows a GPU is for, and
# minibatches that keep full-parameter PPO of a 1.5B model inside 80 GB.
GPU_DEFAULTS = dict(dtype="bfloat16", prompt_tokens=256, response_tokens=256, minibatch=8)


@dataclass
class BenchSetup:
    """Where the update runs and the one batch every variant trains on."""

    device: str = "cpu"
    dtype: str = "float32"
    prompts: int = 8
    samples: int = 4
    prompt_tokens: int = 32
    response_tokens: int = 32
    minibatch: int = 0  # rows per optimiser step; 0: the whole batch in one step
    steps: int = 3  # updates run; the first is a warm-up, the time is the median of the rest

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def minibatch_rows(self) -> int:
        return self.minibatch or self.rows

    @property
    def tokens(self) -> int:
        return self.rows * (self.prompt_tokens + self.response_tokens)


def bench_model(name: str, root: Path) -> Path:
    """The model `name` (MODELS): the tests' tiny model, or a random-init one built once."""
    if name == "tiny":
        from ...common.tasks.addition import AdditionTask
        from ...common.tiny_model import TinyModelSpec, build_tiny_model

        return build_tiny_model(AdditionTask(), TinyModelSpec())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2ForCausalLM

    path = root / "models" / f"bench-{name}"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    if name == "llama-100m":  # big enough that weights and activations dominate
        config = LlamaConfig(
            vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
            tie_word_embeddings=False, pad_token_id=PAD,
        )
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        # bfloat16 on disk: half the bytes
        Qwen2ForCausalLM(qwen2_config(name)).to(torch.bfloat16).save_pretrained(path)
    return path


def qwen2_config(name: str, **keys):
    """Qwen2.5 `name`'s published config (QWEN2_SHAPES, its vocabulary, tied embeddings, rope
    theta, max positions); `keys` replace any of it (e.g. the tokenizer's special ids)."""
    from transformers import Qwen2Config

    return Qwen2Config(**{
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **QWEN2_SHAPES[name], **keys,
    })


def _status_mb(key: str) -> float:
    """A size from /proc/self/status (VmRSS: now, VmHWM: peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _restart_peak_rss() -> float:
    """Start the process's peak RSS afresh (Linux: clear_refs 5), so the import's transient
    peak cannot hide the update's; returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def random_scored_batch(setup: BenchSetup, version: int, vocab_size: int):
    """prompts x samples random responses with random 0/1 rewards (seeded: the same batch for
    every variant)."""
    import random

    from ...common.records import Prompt, Rollout, ScoredRollout

    rng = random.Random(0)
    out = []
    for i in range(setup.prompts):
        prompt_ids = [rng.randrange(1, vocab_size) for _ in range(setup.prompt_tokens)]
        prompt = Prompt(i, "", prompt_ids, {})
        for k in range(setup.samples):
            ids = [rng.randrange(1, vocab_size) for _ in range(setup.response_tokens)]
            logprobs = [0.0] * setup.response_tokens
            rollout = Rollout(prompt, k, ids, "", logprobs, "length", version, 0)
            out.append(ScoredRollout(rollout, float(rng.random() < 0.5)))
    return out


def one_variant(variant: str, model_path: str, setup: BenchSetup) -> dict:
    """Runs in the child process: build the variant, time `setup.steps` updates, report peak
    memory; a CUDA out-of-memory is a result (`oom`), with the peak reached before it."""
    import peft  # noqa: F401  (imported before the baseline: "own" is the model and update)
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(2)
    baseline = _restart_peak_rss()
    vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
    on_gpu = setup.device.startswith("cuda")
    times: list[float] = []
    oom = False
    try:
        update = _variant_update(variant, model_path, setup, vocab_size)
        for _ in range(setup.steps):
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            update()
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        oom = True
    if on_gpu:
        peak, baseline = torch.cuda.max_memory_allocated() / 2**20, 0.0
        device_name = torch.cuda.get_device_name()
    else:
        peak, device_name = _status_mb("VmHWM"), "CPU"
    seconds = None if oom else statistics.median(times[1:] or times)
    return {"variant": variant, "peak_mb": peak, "baseline_mb": baseline, "oom": oom,
            "step_seconds": seconds, "tokens_per_s": None if oom else setup.tokens / seconds,
            "device_name": device_name}


def _variant_update(variant: str, model_path: str, setup: BenchSetup, vocab_size: int):
    """The variant's learner on the batch; returns one update as a callable."""
    from ...common.config import LoRAConfig
    from ...common.records import PreferencePair, SFTExample
    from ...common.specs import LearnerSpec, PolicySpec
    from ...learner.actor import Learner, train_one
    from ...learner.algorithms.registry import algorithm
    from ...learner.model import DTYPES, REWARD, PolicyValueModel
    from ...learner.reward_model import score_rows

    lora = LoRAConfig()
    batch = random_scored_batch(setup, 0, vocab_size)
    rows = [s.rollout.prompt.token_ids + s.rollout.response_ids for s in batch]
    if variant == "rm_actor":
        net = PolicyValueModel(
            model_path, lora, DTYPES[setup.dtype], 0, (REWARD,), setup.device
        )
        return lambda: score_rows(net, rows, PAD)

    name = {"spr": "spr", "grpo": "grpo", "sft_lora": "ppo", "dpo": "ppo"}.get(variant, "ppo")
    algo = algorithm(name).config(epochs=1, minibatch_size=setup.minibatch_rows)
    if variant == "ppo_full":
        return _full_ppo_update(model_path, setup, algo, batch)
    stage = {"sft_lora": "sft", "dpo": "dpo"}.get(variant, "rl")
    learner = Learner(LearnerSpec(
        model_path, PAD, (PolicySpec(algo=algo, lora=lora),), stages=(stage,),
        dtype=setup.dtype, threads=2, device=setup.device,
    ))
    mb = setup.minibatch_rows
    if variant == "sft_lora":
        examples = [SFTExample(i, s.rollout.prompt.token_ids, s.rollout.response_ids)
                    for i, s in enumerate(batch)]

        def update() -> None:
            for start in range(0, len(examples), mb):
                learner.sft_step(examples[start : start + mb])

        return update
    if variant == "dpo":  # pairs of the same prompt's samples: 2k chosen, 2k+1 rejected
        pairs = [PreferencePair(i, a.rollout.prompt.token_ids, a.rollout.response_ids,
                                b.rollout.response_ids)
                 for i, (a, b) in enumerate(zip(batch[0::2], batch[1::2], strict=True))]

        def update() -> None:
            for start in range(0, len(pairs), mb // 2):
                learner.dpo_step(pairs[start : start + mb // 2], beta=0.1)

        return update
    if variant == "ppo_lora_rm":
        learner.start_reward_model(1e-4)
    # Each update trains on rollouts of the adapter version it is at (the learner checks).
    batches = [random_scored_batch(setup, version, vocab_size) for version in range(setup.steps)]

    def update() -> None:
        if variant == "ppo_lora_rm":
            score_rows(learner.net, rows, PAD)
        train_one(learner, batches[learner.version])

    return update


class FullParameterModels:
    """Full-parameter PPO's three model copies (policy, value model + head, frozen reference)
    in the place of the learner's adapter stack, so that the learner's own RL updater and PPO
    objective train them: the same losses, minibatches and steps as ppo_lora."""

    def __init__(self, model_path: str, setup: BenchSetup) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from ...learner.model import DTYPES

        dtype, self.device = DTYPES[setup.dtype], torch.device(setup.device)

        def load():
            return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)

        self.policy, self.value, self.reference = load(), load(), load()
        self.head = torch.nn.Linear(self.value.config.hidden_size, 1, dtype=dtype,
                                    device=self.device)
        self.reference.requires_grad_(False)

    def adapter_parameters(self, name: str) -> list:
        from ...learner.model import POLICY

        if name == POLICY:
            return list(self.policy.parameters())
        return [*self.value.parameters(), *self.head.parameters()]

    def logprobs(self, batch, with_entropy: bool = False, adapters=None):
        """The policy copy's log-probs, or the reference copy's for no adapter ([], or a
        Route's runs of none: as the adapter stack's with every adapter off), run by run."""
        import torch

        from ...learner.model import token_logprobs
        from ...learner.routing import Route

        route = adapters if isinstance(adapters, Route) else Route.whole(
            [] if adapters == [] else "policy", len(batch.input_ids))
        outs = []
        for names, start, end in route.spans():
            rows = batch.select(torch.arange(start, end, device=batch.mask.device))
            model = self.policy if names else self.reference
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
            outs.append(token_logprobs(logits, rows, with_entropy))
        if with_entropy:
            return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return torch.cat(outs)

    def reference_logprobs(self, batch):
        import torch

        with torch.no_grad():
            return self.logprobs(batch, adapters=[])

    def values(self, batch, name=None):
        from ...learner.model import gather_positions

        hidden = self.value.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return self.head(gather_positions(hidden.last_hidden_state, batch.positions)).squeeze(-1)


def _full_ppo_update(model_path: str, setup: BenchSetup, algo, batch: list):
    """Full-parameter PPO through the learner's RL updater (every update on version 0's
    rollouts: nothing here counts versions)."""
    from ...common.specs import PolicySpec
    from ...learner.core import LearnerCore
    from ...learner.rl import RLUpdater

    core = LearnerCore(FullParameterModels(model_path, setup), PAD, algo.max_grad_norm, None,
                       algo.policy_lr)
    rl = RLUpdater(core, PolicySpec(algo=algo))
    from ...learner.rl import train_together

    return lambda: train_together([(rl, batch, 0)])


def run_variant(variant: str, model_path: Path, setup: BenchSetup) -> dict:
    """`one_variant` in a fresh Python process (its own peak)."""
    out = subprocess.run(
        [sys.executable, "-m", "lorafleet.cluster.bench.memory", "--child", variant,
         str(model_path), json.dumps(asdict(setup))],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"bench memory: variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lorafleet bench memory` (and of this module run as a script)."""
    parser.add_argument("--device", help="memory: cpu or cuda (default: cuda if available); "
                        "learner: cpu or cuda (default: cpu)")
    parser.add_argument("--model", choices=MODELS, default="llama-100m",
                        help="memory: model shape, random init (default llama-100m)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="memory: default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--prompts", type=int, default=BenchSetup.prompts,
                        help="memory: prompts per batch (8)")
    parser.add_argument("--samples", type=int, default=BenchSetup.samples,
                        help="memory: samples per prompt (4)")
    parser.add_argument("--prompt-tokens", type=int,
                        help="memory: tokens per prompt (32 on CPU, 256 on GPU)")
    parser.add_argument("--response-tokens", type=int,
                        help="memory: tokens per response (32 on CPU, 256 on GPU)")
    parser.add_argument("--minibatch", type=int,
                        help="memory: rows per optimiser step (CPU: the whole batch; GPU: 8)")
    parser.add_argument("--steps", type=int, default=BenchSetup.steps,
                        help="memory: updates per variant, the first a warm-up (3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="memory: comma-separated subset of " + ",".join(VARIANTS))


def setup_from_args(args: argparse.Namespace) -> BenchSetup:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device.startswith("cuda") else {}
    chosen = {key: getattr(args, key) for key in
              ("dtype", "prompt_tokens", "response_tokens", "minibatch")}
    return BenchSetup(
        device=device, prompts=args.prompts, samples=args.samples, steps=args.steps,
        **{key: value for key, value in defaults.items() if chosen[key] is None},
        **{key: value for key, value in chosen.items() if value is not None},
    )


def bench_memory(args: argparse.Namespace) -> list[dict]:
    """Every chosen variant in its own process; prints the table, returns the rows."""
    from ...common.cache import cache_root

    setup = setup_from_args(args)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"bench memory: unknown variants {unknown}; choose from {VARIANTS}")
    model_path = bench_model(args.model, cache_root())
    results = []
    for variant in variants:
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        results.append(run_variant(variant, model_path, setup))
    print_table(results, args.model, setup)
    return results


def print_table(results: list[dict], model: str, setup: BenchSetup) -> None:
    gib = 2**10
    base = {r["variant"]: r for r in results}.get("sft_lora")
    print(f"\nlearner memory and speed, {model} ({setup.dtype}) on {results[0]['device_name']}: "
          f"{setup.prompts} prompts x {setup.samples} samples x {setup.prompt_tokens}+"
          f"{setup.response_tokens} tokens = {setup.tokens} tokens per update, minibatches of "
          f"{setup.minibatch_rows} rows")
    print("| variant | peak (GiB) | own (GiB) | vs SFT-LoRA | update (s) | tokens/s |"
          " vs SFT-LoRA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        own = r["peak_mb"] - r["baseline_mb"]
        if r["oom"]:
            print(f"| {r['variant']} | OOM (at {r['peak_mb'] / gib:.1f}) | | | | | |")
            continue
        ratios = ("", "")
        if base and not base["oom"]:
            base_own = base["peak_mb"] - base["baseline_mb"]
            ratios = (f"{own / base_own:.2f}x",
                      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        print(f"| {r['variant']} | {r['peak_mb'] / gib:.2f} | {own / gib:.2f} | {ratios[0]} |"
              f" {r['step_seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratios[1]} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # run_variant's fresh process
        variant, model_path, setup_json = sys.argv[2:]
        print(json.dumps(one_variant(variant, model_path, BenchSetup(**json.loads(setup_json)))))
    else:
        parser = argparse.ArgumentParser(prog="python -m lorafleet.cluster.bench.memory",
                                         description=__doc__.splitlines()[0])
        add_arguments(parser)
        bench_memory(parser.parse_args())
