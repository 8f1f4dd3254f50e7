"""The driver: starts or joins Ray, places the actors, runs the stages (offline SFT/DPO and the
synchronous RL loop), verifies every adapter sync, checkpoints, and writes the run directory."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.config import TINY, TrainConfig
from ..common.configio import save_config
from ..common.corpora import LoadedDataset, load_preferences, load_sft
from ..common.data import PromptStream, encode_prompts
from ..common.metrics import MetricsSink, plot_reward_curve, read_metrics, summarize
from ..common.progress import progress
from ..common.records import Prompt, Rollout, ScoredRollout
from .placement import Placement, place_actors

# Zero-copy tensors through the object store: the adapter reaches every worker without copies.
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


def resolve_model(cfg: TrainConfig) -> str:
    """The model directory or hub name every actor loads; builds the embedded model if asked."""
    if cfg.model.name_or_path != TINY:
        return cfg.model.name_or_path
    from ..common.tiny_model import build_tiny_model

    return str(build_tiny_model(cfg.task, cfg.model.tiny))


def sync_tolerance(cfg: TrainConfig) -> float:
    if cfg.rollout.sync_tolerance is not None:
        return cfg.rollout.sync_tolerance
    return 1e-3 if cfg.model.dtype == "float32" else 5e-2


def connect_ray(cfg: TrainConfig) -> bool:
    """Join $RAY_ADDRESS / ray.address, else start a local cluster. True if we started it."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env=RUNTIME_ENV)
        return False
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=RUNTIME_ENV)
    return True


@dataclass
class Fleet:
    """Handles of the running actors."""

    placement: Placement
    learner: object
    workers: list
    reward_actors: list

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [self.learner, *self.workers, *self.reward_actors]:
            ray.kill(actor)
        remove_placement_group(self.placement.group)


def start_fleet(cfg: TrainConfig, model_path: str, pad_token_id: int) -> Fleet:
    import ray

    from ..learner import learner_class
    from ..reward.pool import RewardWorker
    from ..reward.rules import get_reward_fn
    from ..rollout.worker import RolloutWorker

    reward_fn = cfg.reward.fn or cfg.task.reward_fn
    get_reward_fn(reward_fn)  # fail here, naming the function, not inside an actor
    placement = place_actors(cfg)
    algo = cfg.algo.name if "rl" in cfg.stages else None
    learner = ray.remote(learner_class(algo, cfg.algo.spr_normalizer)).options(
        num_cpus=cfg.learner.cpus, scheduling_strategy=placement.strategy(placement.learner),
        name="lorafleet-learner",
    ).remote(
        model_path, cfg.lora, cfg.algo, dtype=cfg.model.dtype, seed=cfg.seed,
        threads=cfg.learner.threads, pad_token_id=pad_token_id,
    )
    workers = [
        ray.remote(RolloutWorker).options(
            num_cpus=cfg.rollout.cpus_per_worker, scheduling_strategy=placement.strategy(bundle),
            name=f"lorafleet-rollout-{i}",
        ).remote(
            model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
            max_lora_rank=cfg.lora.rank, seed=cfg.seed, kv_cache_gib=cfg.rollout.kv_cache_gib,
            threads=cfg.rollout.threads_per_worker, worker_id=i,
        )
        for i, bundle in enumerate(placement.rollout)
    ]
    reward_actors = [
        ray.remote(RewardWorker).options(
            num_cpus=cfg.reward.cpus_per_actor, scheduling_strategy=placement.strategy(bundle),
            name=f"lorafleet-reward-{i}",
        ).remote(reward_fn)
        for i, bundle in enumerate(placement.reward)
    ]
    # Surface construction errors (bad model path, vLLM start failure) before the loop.
    ray.get([w.__ray_ready__.remote() for w in [learner, *workers, *reward_actors]])
    return Fleet(placement, learner, workers, reward_actors)


def shard(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal shards (every item in exactly one shard)."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def fresh_run_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... if it already holds a run: never overwrite one."""
    candidate, k = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    if candidate != path:
        print(f"{path} already holds a run; writing to {candidate}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def check_exactly_once(prompts: list[Prompt], rollouts: list[Rollout], n: int) -> None:
    """Every prompt of the batch came back with exactly n samples; nothing lost or doubled."""
    counts: dict[int, int] = {}
    for r in rollouts:
        counts[r.prompt.index] = counts.get(r.prompt.index, 0) + 1
    expected = {p.index: n for p in prompts}
    if counts != expected:
        wrong = sorted(i for i in expected.keys() | counts.keys() if counts.get(i) != n)
        raise RuntimeError(f"rollouts do not match the prompts (n={n} each) for {wrong[:10]}")


def print_summary(run_dir: Path, summary: dict) -> None:
    print(f"\nrun directory: {run_dir}")
    print("  held-out reward after each stage   (sampled / greedy):")
    for row in summary["stage_evals"]:
        print(f"    {row['stage']:>5s}: {row['eval_reward']:.3f} / {row['eval_greedy']:.3f}")
    if "window" not in summary:  # no RL stage
        print(f"  wall time: {summary['wall_seconds']:.0f} s")
        return
    w = summary["window"]
    print(f"  train reward, first {w} iterations : {summary['reward_first_iterations']:.3f}")
    print(f"  train reward, last {w} iterations  : {summary['reward_last_iterations']:.3f}")
    print(f"  KL to reference, last {w} iter.    : {summary['kl_last_iterations']:.3f}")
    print(f"  iteration time / wall time        : {summary['mean_step_seconds']:.2f} s / "
          f"{summary['wall_seconds']:.0f} s")


def load_stage_data(cfg: TrainConfig, tokenizer) -> dict[str, LoadedDataset]:
    """The offline stages' datasets, tokenised and checked before any actor starts."""
    loaders = {"sft": (load_sft, cfg.sft.data), "dpo": (load_preferences, cfg.dpo.data)}
    data = {}
    for stage in dict.fromkeys(cfg.stages):
        if stage in loaders:
            load, source = loaders[stage]
            data[stage] = load(source, cfg.task, tokenizer, cfg.model.max_model_len)
            print(f"{stage} data: {data[stage].describe()}")
    return data


class Trainer:
    """Runs `cfg.stages` on one fleet: offline stages (sft, dpo) step the learner over a
    dataset, the rl stage runs the rollout/reward/update loop; held-out evaluation after each."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    # -- one phase each -------------------------------------------------------------------
    def sync_adapter(self) -> tuple[float, float]:
        """Publish once, hot-swap on every worker, verify with the probe.
        Returns (publish->all-serving seconds, max probe log-prob gap)."""
        import ray

        fleet = self.fleet
        start = time.perf_counter()
        snapshot = fleet.learner.publish.remote()  # stored once in the object store
        ray.get([w.load_snapshot.remote(snapshot) for w in fleet.workers])
        seconds = time.perf_counter() - start
        probes = ray.get([
            w.probe.remote(self.probe_ids, self.cfg.rollout.max_new_tokens) for w in fleet.workers
        ])
        gap = ray.get(fleet.learner.check_probe.remote(probes, sync_tolerance(self.cfg)))
        return seconds, gap

    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int
    ) -> list[Rollout]:
        import ray

        parts = shard(prompts, len(self.fleet.workers))
        results = ray.get([
            w.generate.remote(
                part, n=n, temperature=temperature, max_tokens=self.cfg.rollout.max_new_tokens,
                seed=seed,
            )
            for w, part in zip(self.fleet.workers, parts, strict=True) if part
        ])
        rollouts = [r for part in results for r in part]
        check_exactly_once(prompts, rollouts, n)
        return rollouts

    def evaluate(self) -> dict[str, float]:
        """Held-out prompts: mean reward of samples drawn as in training (the quantity RL
        maximises), and of greedy answers (accuracy)."""
        rollout = self.cfg.rollout
        result = {}
        for key, n, temperature in (
            ("eval_reward", rollout.samples_per_prompt, rollout.temperature),
            ("eval_greedy", 1, 0.0),
        ):
            scored = self.pool.score(
                self.generate(self.held_out, n=n, temperature=temperature, seed=self.cfg.seed)
            )
            result[key] = sum(s.reward for s in scored) / len(scored)
        return result

    # -- stages -----------------------------------------------------------------------------
    def run_offline_stage(self, stage: str, data: LoadedDataset, number: int) -> None:
        """Shuffled minibatches of the dataset, one learner step each, `epochs` passes."""
        import ray

        section = self.cfg.sft if stage == "sft" else self.cfg.dpo
        learner = self.fleet.learner
        ray.get(learner.start_stage.remote(section.lr))
        batches = []
        for epoch in range(section.epochs):
            order = list(range(len(data.items)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            batches += [
                (epoch, order[i : i + section.batch_size])
                for i in range(0, len(order), section.batch_size)
            ]
        bar = progress(batches, desc=f"stage {number} {stage.upper()}", unit="step")
        for step, (epoch, rows) in enumerate(bar):
            items = [data.items[i] for i in rows]
            call = (
                learner.sft_step.remote(items) if stage == "sft"
                else learner.dpo_step.remote(items, self.cfg.dpo.beta)
            )
            stats = ray.get(call)
            self.sink.log({"stage": stage, "step": step, "epoch": epoch, **vars(stats)})
            bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        ray.get(learner.save.remote(str(self.run_dir / "checkpoints" / f"stage{number}_{stage}")))

    def run_rl_stage(self, initial_eval: dict[str, float]) -> None:
        """`iterations` of: sync adapter, (evaluate), generate, score, update, log."""
        import ray

        cfg, n = self.cfg, self.cfg.rollout.samples_per_prompt
        ray.get(self.fleet.learner.start_stage.remote(cfg.algo.policy_lr))
        bar = progress(range(cfg.iterations), desc=cfg.algo.name.upper(), unit="iter")
        for it in bar:
            iter_start = time.perf_counter()
            sync_s, probe_gap = self.sync_adapter()
            evals = {"eval_reward": None, "eval_greedy": None}
            if it == 0:  # the adapter the previous stage evaluation just measured
                evals = initial_eval
            elif cfg.eval_every and it % cfg.eval_every == 0:
                evals = self.evaluate()
            gen_start = time.perf_counter()
            prompts = self.stream.next_batch(cfg.prompts_per_iteration)
            rollouts = self.generate(
                prompts, n=n, temperature=cfg.rollout.temperature,
                seed=cfg.seed * 7919 + it * 104729,
            )
            gen_s = time.perf_counter() - gen_start
            tokens = sum(len(r.response_ids) for r in rollouts)
            scored: list[ScoredRollout] = self.pool.score(rollouts)
            stats = ray.get(self.fleet.learner.train_step.remote(scored))
            rewards = [s.reward for s in scored]
            row = {
                "stage": "rl",
                "iteration": it,
                "adapter_version": stats.adapter_version,
                "reward_mean": sum(rewards) / len(rewards),
                **evals,
                "kl": stats.kl,
                "rollout_tokens_per_s": tokens / gen_s,
                "step_seconds": time.perf_counter() - iter_start,
                "sync_seconds": sync_s,
                "probe_max_logprob_gap": probe_gap,
                "response_tokens": tokens,
                "prompt_cursor": self.stream.cursor,
                **{k: v for k, v in vars(stats).items() if k not in ("adapter_version", "kl")},
            }
            self.sink.log(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{stats.kl:.4f}", refresh=False)
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
                ckpt = self.run_dir / "checkpoints" / f"iter_{it + 1:05d}"
                ray.get(self.fleet.learner.save.remote(str(ckpt)))

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> Path:
        import ray
        from transformers import AutoTokenizer

        from ..reward.pool import RewardPool

        cfg = self.cfg
        run_start = time.perf_counter()
        model_path = resolve_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
        train = encode_prompts(cfg.task.examples("train"), tokenizer, limit)
        self.held_out = encode_prompts(cfg.task.examples("eval"), tokenizer, limit)
        stage_data = load_stage_data(cfg, tokenizer)
        # Created only once the inputs are known good: a failed start leaves no half run.
        self.run_dir = fresh_run_dir(self.run_dir)
        cfg.run_dir = str(self.run_dir)
        save_config(cfg, self.run_dir / "config.yaml")
        self.stream = PromptStream(train, cfg.seed)
        self.probe_ids = [p.token_ids for p in self.held_out[: cfg.rollout.probe_prompts]]

        started_ray = connect_ray(cfg)
        self.fleet = start_fleet(cfg, model_path, tokenizer.pad_token_id)
        self.pool = RewardPool(self.fleet.reward_actors, cfg.reward.batch_size)
        self.sink = MetricsSink(self.run_dir)
        try:
            self.sync_adapter()
            stage_evals = [{"stage": "start", **self.evaluate()}]
            for number, stage in enumerate(cfg.stages, start=1):
                if stage == "rl":
                    self.run_rl_stage({k: stage_evals[-1][k] for k in EVAL_KEYS})
                else:
                    self.run_offline_stage(stage, stage_data[stage], number)
                self.sync_adapter()
                evals = self.evaluate()
                stage_evals.append({"stage": stage, **evals})
                self.sink.log({"stage": "eval", "after_stage": number, "after": stage, **evals})
            rl_rows = read_metrics(self.run_dir)
            summary = {
                "stages": cfg.stages, "stage_evals": stage_evals, "iterations": cfg.iterations,
                **{f"final_{k}": stage_evals[-1][k] for k in EVAL_KEYS},
                "datasets": {k: v.describe() for k, v in stage_data.items()},
                "wall_seconds": time.perf_counter() - run_start,
                **(summarize(rl_rows) if rl_rows else {}),
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            ray.get(self.fleet.learner.save.remote(str(self.run_dir / "adapter")))
        finally:
            self.fleet.kill()
            if started_ray:
                ray.shutdown()
        if rl_rows:
            plot_reward_curve(self.run_dir)
        print_summary(self.run_dir, summary)
        return self.run_dir


EVAL_KEYS = ("eval_reward", "eval_greedy")
