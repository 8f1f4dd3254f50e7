"""The actors of a run and keeping them in step: joining Ray, the groups of a run (learner,
rollout workers, reward actors) placed and started, publishing the adapter to every worker
with a verified sync, and bringing a restarted rollout worker back before it works again."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..common.config import TINY
from ..common.configio import ConfigError
from ..common.devices import model_dtype
from ..common.logs import library_env, log_level
from ..common.records import ProbeResult, Prompt, Rollout
from ..common.run_dir import RunDir
from ..common.specs import LearnerSpec
from ..common.tasks.base import Task
from ..reward.pool import RewardSpec
from ..rollout.worker import POLICY, level_slot
from .actor_group import ActorGroup, Calls, GroupSpec, Placement, Resources, place
from .config import TrainConfig

# Zero-copy tensors through the object store: the adapter reaches every worker without copies.
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


def resolve_model(cfg: TrainConfig, task: Task) -> str:
    """The model directory (absolute) or hub name every actor loads; builds the embedded model
    (for `task`) if asked. A model that cannot be found fails here, naming model.name_or_path."""
    name = cfg.model.name_or_path
    if name == TINY:
        from ..common.tiny_model import build_tiny_model

        return str(build_tiny_model(task.model_recipe, cfg.model.tiny))
    what = f"model.name_or_path={name!r}"
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or path.is_dir():
        if not (path / "config.json").is_file():
            problem = "has no config.json" if path.is_dir() else "does not exist"
            raise ConfigError(f"{what}: the local model directory {path} {problem}; give a "
                              f"Hugging Face model directory, a hub name, or {TINY}")
        return str(path.resolve())  # actors may run in another working directory
    check_hub_model(name, what)
    return name


def check_hub_model(name: str, what: str) -> None:
    """In the local hub cache, or found on the hub by one request (no retries)."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        if constants.HF_HUB_OFFLINE:
            problem = "not in the local hub cache and HF_HUB_OFFLINE is set"
        elif file_exists(name, "config.json"):
            return
        else:
            problem = "no such model on the hub (a gated or private one needs `hf auth login`)"
    except Exception as exc:  # not a repo id, network down, gated: all for the user to fix
        cause = str(exc).partition("\n")[0]
        problem = f"looking it up on the hub failed ({type(exc).__name__}: {cause})"
    raise ConfigError(f"{what}: neither a local directory nor a model on the hub: {problem}; "
                      f"give a Hugging Face model directory, a reachable hub name, or {TINY}")


def driver_tokenizer(cfg: TrainConfig, model_path: str):
    """The tokenizer that renders and tokenises the prompts (vLLM and the learner get its token
    ids), with model.chat_template in place of the model's own when set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cfg.model.chat_template is not None:
        tokenizer.chat_template = cfg.model.chat_template
    return tokenizer


def reward_rules(cfg: TrainConfig, columns: Collection[str] | None = None) -> tuple[str, ...]:
    """The reward functions' names (reward.fns, else the task's own), checked here so that a
    bad one fails before any actor starts, naming its key; with the prompts' `columns`, also
    that each function takes the batch and finds the columns it needs."""
    from ..reward.registry import check_reward_fn, get_reward_fn

    key = "reward.fns" if cfg.reward.fns else "task.reward_fn"
    names = tuple(cfg.reward.fns) or (cfg.task.reward_fn,)
    for name in names:
        fn = get_reward_fn(name, key, cfg.reward.fn_settings())
        if columns is not None:
            check_reward_fn(fn, name, key, columns)
    return names


def reward_model_dir(cfg: TrainConfig, run_dir: RunDir) -> str | None:
    """The reward model the run scores with: reward.model, or the one its rm stage trains."""
    if "rm" in cfg.stages:
        return str(run_dir.reward_model)
    return cfg.reward.model


def reward_spec(cfg: TrainConfig, model: str | None):
    """What the reward actors compute; `model`: the reward model directory they load (None:
    no model, or the learner holds it). The driver uses the same spec to add the learner's
    reward-model scores when reward.model_on_learner is set."""
    from ..reward.pool import RewardSpec

    reward = cfg.reward
    return RewardSpec(
        rules=reward_rules(cfg), rule_weight=reward.rule_weight, model=model,
        model_weight=reward.model_weight, threads=reward.threads_per_actor,
        skip_errors=reward.on_error == "skip", weights=tuple(reward.weights) or None,
        fn_settings=tuple(reward.fn_settings().items()),
    )


def sync_tolerance(cfg: TrainConfig) -> float:
    if cfg.rollout.sync_tolerance is not None:
        return cfg.rollout.sync_tolerance
    dtypes = {model_dtype(cfg.model.dtype, gpus > 0)
              for gpus in (cfg.learner.num_gpus, cfg.rollout.num_gpus_per_worker)}
    return 1e-3 if dtypes == {"float32"} else 5e-2


def connect_ray(cfg: TrainConfig) -> bool:
    """Join $RAY_ADDRESS / ray.address (a `ray job submit` job sets it), else start a local
    cluster bound to loopback. True if we started it. The actors get the libraries' log level
    (common/logs.py) with the other variables."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    env = {**RUNTIME_ENV["env_vars"], **library_env()}
    driver_logs = {"logging_level": logging.getLevelName(log_level())}  # Ray's, in this process
    if address:
        # A submitted job's runtime_env (deploy/runtime_env.yaml) already sets these in our
        # environment, and Ray refuses to merge duplicate keys: add only what is missing.
        missing = {k: v for k, v in env.items() if k not in os.environ}
        ray.init(address=address, runtime_env={"env_vars": missing} if missing else None,
                 **driver_logs)
        return False
    ray.init(
        num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
        _node_ip_address="127.0.0.1", **driver_logs,
    )
    return True


def shard(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal shards (every item in exactly one shard)."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def check_exactly_once(prompts: list[Prompt], rollouts: list[Rollout], n: int) -> None:
    """Every prompt of the batch came back with exactly n samples; nothing lost or doubled."""
    counts: dict[int, int] = {}
    for r in rollouts:
        counts[r.prompt.index] = counts.get(r.prompt.index, 0) + 1
    expected = {p.index: n for p in prompts}
    if counts != expected:
        wrong = sorted(i for i in expected.keys() | counts.keys() if counts.get(i) != n)
        raise RuntimeError(f"rollouts do not match the prompts (n={n} each) for {wrong[:10]}")


def role_resources(
    prefix: str, cpus: tuple[str, float], gpus: tuple[str, float], custom: tuple[str, dict]
) -> tuple[Resources, dict[str, str]]:
    """An actor's bundle from its config keys (name, value), and which key asks for what."""
    keys = {"CPU": f"{prefix}.{cpus[0]}", "GPU": f"{prefix}.{gpus[0]}"}
    keys |= {name: f"{prefix}.{custom[0]}.{name}" for name in custom[1]}
    return Resources(cpus[1], gpus[1], dict(custom[1])), keys


def group_specs(cfg: TrainConfig) -> list[GroupSpec]:
    """The learner, the rollout workers and the reward actors; the last two only when a stage
    generates (an rm stage alone trains on preference pairs and evaluates nothing)."""
    from ..learner.actor import Learner
    from ..reward.pool import RewardWorker
    from ..rollout.worker import AdapterMissing, RolloutWorker

    generates = any(stage != "rm" for stage in cfg.stages)
    restarts = cfg.ray.max_actor_restarts
    learner, rollout, reward = cfg.learner, cfg.rollout, cfg.reward
    return [
        # The learner holds the only copy of the training state: no restart (resume from the
        # last checkpoint instead); rollout and reward actors are stateless and restart.
        GroupSpec("learner", Learner, 1, *role_resources(
            "learner", ("cpus", learner.cpus), ("num_gpus", learner.num_gpus),
            ("resources", learner.resources)), "lorafleet-learner"),
        # A worker's bundle holds all its engine's GPUs (tensor_parallel_size of them), so
        # they sit on one node and vLLM shards over the worker's own CUDA_VISIBLE_DEVICES.
        GroupSpec("rollout", RolloutWorker, rollout.num_workers if generates else 0,
                  *role_resources(
                      "rollout", ("cpus_per_worker", rollout.cpus_per_worker),
                      ("num_gpus_per_worker", rollout.num_gpus_per_worker),
                      ("resources_per_worker", rollout.resources_per_worker)),
                  "lorafleet-rollout-{i}", max_restarts=restarts, index_kwarg="worker_id",
                  lost_state=(AdapterMissing,)),
        # Scoring is a pure function of the rollout: Ray itself re-runs a lost batch on the
        # restarted actor (max_task_retries); a reward that raises is not retried.
        GroupSpec("reward", RewardWorker, reward.num_actors if generates else 0,
                  *role_resources(
                      "reward", ("cpus_per_actor", reward.cpus_per_actor),
                      ("num_gpus_per_actor", reward.num_gpus_per_actor),
                      ("resources_per_actor", reward.resources_per_actor)),
                  "lorafleet-reward-{i}", max_restarts=restarts, max_task_retries=restarts),
    ]


def fixed_cluster(cfg: TrainConfig) -> bool:
    """A local cluster (no address to join): no autoscaler will add what is missing."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


@dataclass(frozen=True)
class SyncFigures:
    """A verified sync: publish -> all-serving seconds, the largest probe log-prob gap, and
    the adapter version each worker reported."""

    seconds: float
    probe_gap: float
    versions: dict[int, int]  # worker -> adapter version


@dataclass
class AdapterSync:
    """A publish under way: when it started, the workers' swaps and their probes."""

    start: float
    loads: Calls
    probes: Calls


class Fleet:
    """The run's actor groups, the adapter the rollout workers must serve, and bringing a
    restarted rollout worker back to it (verified) before it works again."""

    def __init__(
        self, cfg: TrainConfig, placement: Placement, learner: ActorGroup, rollout: ActorGroup,
        reward: ActorGroup, probe_ids: list[list[int]],
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.groups = [learner, rollout, reward]
        self.learner = learner.actors[0]
        self.rollout = rollout
        self.reward = reward
        self.probe_ids = probe_ids
        self.snapshot = None  # ObjectRef of the adapter the workers must serve
        self.level_snapshots: dict[int, object] = {}  # meet level -> ObjectRef, served beside
        self.verified: SyncFigures | None = None  # the last verified sync of the policy
        rollout.revive = self.resync_worker

    def resync_worker(self, i: int) -> None:
        """The current adapters (policy, meet levels) on restarted worker i, verified with the
        probe."""
        import ray

        worker = self.rollout.actors[i]
        if self.snapshot is not None:
            # Published again: in async mode the learner may have moved past the last snapshot
            # while the worker died (this call waits for its update), and the probe is checked
            # against the learner's current weights.
            self.snapshot = self.learner.publish.remote()
        served = [(None, self.snapshot)] if self.snapshot is not None else []
        for level, snapshot in served + list(self.level_snapshots.items()):
            slot = POLICY if level is None else level_slot(level)
            ray.get(worker.load_snapshot.remote(snapshot, slot))
            probe = ray.get(worker.probe.remote(
                self.probe_ids, self.cfg.rollout.max_new_tokens, slot))
            self.check_served([probe], level)

    def check_served(self, probes: list[ProbeResult], level: int | None) -> float:
        """The learner's check of the workers' probes of the policy (`level` None) or of meet
        level `level` (its control + shared adapters); returns the max log-prob gap."""
        import ray

        tolerance = sync_tolerance(self.cfg)
        check = (self.learner.check_probe.remote(probes, tolerance) if level is None
                 else self.learner.check_level_probe.remote(probes, tolerance, level))
        return ray.get(check)

    # -- adapter publishing ---------------------------------------------------------------------
    def sync_adapter(self) -> SyncFigures:
        """Publish once, hot-swap on every worker, verify with the probe; nothing to do when
        the workers already serve the learner's version, verified (a restarted worker is
        brought back by `resync_worker`). Returns the verified sync's figures."""
        import ray

        version = ray.get(self.learner.get_version.remote())
        if self.verified is not None and set(self.verified.versions.values()) == {version}:
            return self.verified
        return self.finish_sync(self.start_sync())

    def start_sync(self) -> AdapterSync:
        """`sync_adapter` without waiting: each worker swaps the adapter in after the requests
        already queued on it (the fleet never pauses) and then runs the probe."""
        start = time.perf_counter()
        self.snapshot = self.learner.publish.remote()  # stored once in the object store
        loads = self.rollout.submit(lambda w, _: w.load_snapshot.remote(self.snapshot))
        max_tokens = self.cfg.rollout.max_new_tokens
        probes = self.rollout.submit(lambda w, _: w.probe.remote(self.probe_ids, max_tokens))
        return AdapterSync(start, loads, probes)

    def finish_sync(self, sync: AdapterSync) -> SyncFigures:
        """Waits for a started sync and verifies its probes against the learner, which must
        still hold the published version (else SyncError). Returns as `sync_adapter`."""
        self.rollout.collect(sync.loads)
        seconds = time.perf_counter() - sync.start
        probes = self.rollout.collect(sync.probes)
        gap = self.check_served(probes, None)
        self.verified = SyncFigures(seconds, gap, {p.worker_id: p.adapter_version for p in probes})
        return self.verified

    def sync_levels(self, levels: int) -> float:
        """Publish every meet level's adapter once, load all of them beside the policy on every
        worker, verify each with the probe against the learner's control + shared adapters.
        Returns the max probe log-prob gap."""
        max_tokens, worst = self.cfg.rollout.max_new_tokens, 0.0
        for level in range(levels):
            slot = level_slot(level)
            self.level_snapshots[level] = snapshot = self.learner.publish_level.remote(level)
            self.rollout.call(lambda w, _, ref=snapshot, slot=slot: w.load_snapshot.remote(
                ref, slot))
            probes = self.rollout.call(lambda w, _, slot=slot: w.probe.remote(
                self.probe_ids, max_tokens, slot))
            worst = max(worst, self.check_served(probes, level))
        return worst

    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int,
        slot: str = POLICY,
    ) -> list[Rollout]:
        calls = self.submit_generate(prompts, n=n, temperature=temperature, seed=seed, slot=slot)
        return self.collect_generate(prompts, calls, n)

    def submit_generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int,
        slot: str = POLICY,
    ) -> Calls:
        """`generate` without waiting: the prompts sharded over the workers, queued on each
        behind its earlier requests (and adapter swaps); `slot`: the served adapter to use."""
        if not self.rollout.actors:
            raise RuntimeError(f"stages {self.cfg.stages} generate nothing: this fleet has no "
                               "rollout workers")
        rollout = self.cfg.rollout
        parts = shard(prompts, len(self.rollout.actors))
        return self.rollout.submit(
            lambda w, part: w.generate.remote(
                part, n=n, temperature=temperature, max_tokens=rollout.max_new_tokens, seed=seed,
                stop=rollout.stop, stop_token_ids=rollout.stop_token_ids, slot=slot,
            ),
            {i: part for i, part in enumerate(parts) if part},  # fewer prompts than workers
        )

    def collect_generate(self, prompts: list[Prompt], calls: Calls, n: int) -> list[Rollout]:
        rollouts = [r for part in self.rollout.collect(calls) for r in part]
        check_exactly_once(prompts, rollouts, n)
        return rollouts

    def kill(self) -> None:
        for group in self.groups:
            group.kill()
        self.placement.remove()


def learner_spec(cfg: TrainConfig, model_path: str, pad_token_id: int) -> LearnerSpec:
    """What the learner actor is built from (`model_path`: resolve_model's)."""
    return LearnerSpec(
        model_path=model_path, pad_token_id=pad_token_id, algo=cfg.algo, lora=cfg.lora,
        stages=tuple(cfg.stages), dtype=cfg.model.dtype, seed=cfg.seed,
        threads=cfg.learner.threads, attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.learner.gradient_checkpointing,
        autocast=cfg.learner.autocast, max_staleness=cfg.rollout.staleness_bound,
        max_behaviour_weight=cfg.rollout.max_behaviour_weight,
    )


def start_fleet(
    cfg: TrainConfig, model_path: str, pad_token_id: int, probe_ids: list[list[int]],
    reward: RewardSpec, served_levels: int = 0,
) -> Fleet:
    """Places and starts the groups of `group_specs`; returns once every actor is up (a
    construction error, e.g. a vLLM start failure, raises here, the actors stopped). The
    rollout workers serve the policy and `served_levels` meet level adapters at once."""
    import ray

    learner_group, rollout_spec, reward_group = group_specs(cfg)
    placement = place([learner_group, rollout_spec, reward_group], cfg.placement.strategy,
                      cfg.placement.timeout_s, fixed_cluster(cfg))
    learner = ActorGroup.start(
        learner_group, placement, learner_spec(cfg, model_path, pad_token_id))
    rollout = ActorGroup.start(
        rollout_spec, placement, model_path, dtype=cfg.model.dtype,
        max_model_len=cfg.model.max_model_len, max_lora_rank=cfg.served_lora_rank, seed=cfg.seed,
        kv_cache_gib=cfg.rollout.kv_cache_gib, threads=cfg.rollout.threads_per_worker,
        tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, max_loras=1 + served_levels,
        prompt_embeds=cfg.serves_soft_prompts,
    )
    rewards = ActorGroup.start(reward_group, placement, reward)
    fleet = Fleet(cfg, placement, learner, rollout, rewards, probe_ids)
    try:
        ray.get([ref for group in fleet.groups for ref in group.ready()])
    except BaseException:
        fleet.kill()
        raise
    return fleet
