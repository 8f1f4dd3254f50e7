"""The actors of a run and keeping them in step: joining Ray, placing and starting the
learner, rollout workers and reward actors, publishing the adapter to every worker with a
verified sync, and bringing a restarted rollout worker back before it works again."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..common.config import TINY
from ..common.configio import ConfigError
from ..common.logs import library_env, log_level
from ..common.records import Prompt, Rollout
from ..common.tasks.registry import build_task
from .config import TrainConfig
from .placement import Placement, place_actors

REWARD_MODEL_DIR = "reward_model"  # in the run directory, written by an rm stage
RESTART_TIMEOUT_S = 600  # a restarted rollout worker reloads its model and engine

# Zero-copy tensors through the object store: the adapter reaches every worker without copies.
RUNTIME_ENV = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}}


def resolve_model(cfg: TrainConfig) -> str:
    """The model directory (absolute) or hub name every actor loads; builds the embedded model
    if asked. A model that cannot be found fails here, naming model.name_or_path."""
    name = cfg.model.name_or_path
    if name == TINY:
        from ..common.tiny_model import build_tiny_model

        return str(build_tiny_model(build_task(cfg.task).model_recipe, cfg.model.tiny))
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


def reward_rule(cfg: TrainConfig) -> str:
    """The rule function's name (reward.fn, else the task's own), checked here so that a bad
    one fails before any actor starts, naming its key."""
    from ..reward.registry import get_reward_fn

    name = cfg.reward.fn or cfg.task.reward_fn
    get_reward_fn(name, "reward.fn" if cfg.reward.fn else "task.reward_fn")
    return name


def reward_model_dir(cfg: TrainConfig) -> str | None:
    """The reward model the run scores with: reward.model, or the one its rm stage trains."""
    if "rm" in cfg.stages:
        return str(Path(cfg.run_dir) / REWARD_MODEL_DIR)
    return cfg.reward.model


def reward_spec(cfg: TrainConfig):
    """What the reward actors compute (the driver uses the same spec to add the learner's
    reward-model scores when reward.model_on_learner is set)."""
    from ..reward.pool import RewardSpec

    reward = cfg.reward
    return RewardSpec(
        rule=reward_rule(cfg), rule_weight=reward.rule_weight,
        model=None if reward.model_on_learner else reward_model_dir(cfg),
        model_weight=reward.model_weight, threads=reward.threads_per_actor,
        skip_errors=reward.on_error == "skip",
    )


def sync_tolerance(cfg: TrainConfig) -> float:
    if cfg.rollout.sync_tolerance is not None:
        return cfg.rollout.sync_tolerance
    return 1e-3 if cfg.model.dtype == "float32" else 5e-2


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


def is_actor(exc: Exception, handle) -> bool:
    """Whether an actor error is about this actor (and not one it depended on)."""
    actor_id = getattr(exc, "actor_id", None)
    return actor_id is not None and actor_id == handle._actor_id.hex()


class Fleet:
    """Handles of the running actors, the adapter they should serve, and recovery."""

    def __init__(
        self, cfg: TrainConfig, placement: Placement, learner, workers: list,
        reward_actors: list, probe_ids: list[list[int]],
    ) -> None:
        self.cfg = cfg
        self.placement = placement
        self.learner = learner
        self.workers = workers
        self.reward_actors = reward_actors
        self.probe_ids = probe_ids
        self.snapshot = None  # ObjectRef of the adapter the workers must serve
        self.worker_restarts = 0
        self.on_restart = None  # callback(role) for metrics

    # -- calls on every rollout worker, surviving worker deaths -------------------------------
    def on_workers(self, call, items: dict[int, object] | None = None) -> list:
        """`call(worker, item)` -> ObjectRef for each worker index in `items` (every worker,
        with item None, by default); a worker that dies is restarted by Ray, given the current
        adapter, verified, and its call is sent again. Results in the order of `items`."""
        import ray

        items = items if items is not None else dict.fromkeys(range(len(self.workers)))
        refs = {i: call(self.workers[i], item) for i, item in items.items()}
        results = []
        for i, ref in refs.items():
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except ray.exceptions.RayActorError as exc:
                    if not is_actor(exc, self.workers[i]):  # e.g. the learner behind an arg
                        raise
                    self.recover_worker(i, exc)
                    ref = call(self.workers[i], items[i])
        return results

    def recover_worker(self, i: int, exc: Exception) -> None:
        import ray

        worker = self.workers[i]
        cause = str(exc).splitlines()[0][:200]
        print(f"rollout worker {i} died ({cause}); waiting for Ray to restart it", flush=True)
        start = time.perf_counter()
        while True:
            try:
                ray.get(worker.__ray_ready__.remote())
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: calls fail fast
                if time.perf_counter() - start > RESTART_TIMEOUT_S:
                    raise RuntimeError(
                        f"rollout worker {i} did not come back within {RESTART_TIMEOUT_S} s"
                    ) from exc
                time.sleep(1.0)
            except ray.exceptions.RayActorError:
                raise RuntimeError(
                    f"rollout worker {i} died and was not restarted (ray.max_actor_restarts="
                    f"{self.cfg.ray.max_actor_restarts} used up, or its node is gone)"
                ) from exc
        if self.snapshot is not None:
            ray.get(worker.load_snapshot.remote(self.snapshot))
            probe = ray.get(worker.probe.remote(self.probe_ids, self.cfg.rollout.max_new_tokens))
            ray.get(self.learner.check_probe.remote([probe], sync_tolerance(self.cfg)))
        self.worker_restarts += 1
        if self.on_restart is not None:
            self.on_restart("rollout")
        print(f"rollout worker {i} is back ({time.perf_counter() - start:.1f} s) and serves the"
              " current adapter", flush=True)

    # -- adapter publishing ---------------------------------------------------------------------
    def sync_adapter(self) -> tuple[float, float, dict[int, int]]:
        """Publish once, hot-swap on every worker, verify with the probe. Returns (publish ->
        all-serving seconds, max probe log-prob gap, {worker: adapter version})."""
        import ray

        start = time.perf_counter()
        self.snapshot = self.learner.publish.remote()  # stored once in the object store
        self.on_workers(lambda w, _: w.load_snapshot.remote(self.snapshot))
        seconds = time.perf_counter() - start
        max_tokens = self.cfg.rollout.max_new_tokens
        probes = self.on_workers(lambda w, _: w.probe.remote(self.probe_ids, max_tokens))
        gap = ray.get(self.learner.check_probe.remote(probes, sync_tolerance(self.cfg)))
        return seconds, gap, {p.worker_id: p.adapter_version for p in probes}

    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, seed: int
    ) -> list[Rollout]:
        max_tokens = self.cfg.rollout.max_new_tokens
        parts = shard(prompts, len(self.workers))
        results = self.on_workers(
            lambda w, part: w.generate.remote(
                part, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed
            ),
            {i: part for i, part in enumerate(parts) if part},  # fewer prompts than workers
        )
        rollouts = [r for part in results for r in part]
        check_exactly_once(prompts, rollouts, n)
        return rollouts

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in [self.learner, *self.workers, *self.reward_actors]:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement.group)


def start_fleet(
    cfg: TrainConfig, model_path: str, pad_token_id: int, probe_ids: list[list[int]]
) -> Fleet:
    import ray

    from ..learner.algorithms.registry import learner_class
    from ..reward.pool import RewardWorker
    from ..rollout.worker import RolloutWorker

    spec = reward_spec(cfg)  # checks the reward function before any actor starts
    placement = place_actors(cfg)
    algo = cfg.algo if "rl" in cfg.stages else None
    # The learner holds the only copy of the training state: no restart (resume from the
    # last checkpoint instead); rollout/reward actors are stateless and restart.
    learner = ray.remote(learner_class(algo)).options(
        num_cpus=cfg.learner.cpus, scheduling_strategy=placement.strategy(placement.learner),
        name="lorafleet-learner", max_restarts=0,
    ).remote(
        model_path, cfg.lora, cfg.algo, dtype=cfg.model.dtype, seed=cfg.seed,
        threads=cfg.learner.threads, pad_token_id=pad_token_id,
    )
    restarts = cfg.ray.max_actor_restarts
    workers = [
        ray.remote(RolloutWorker).options(
            num_cpus=cfg.rollout.cpus_per_worker, scheduling_strategy=placement.strategy(bundle),
            name=f"lorafleet-rollout-{i}", max_restarts=restarts, max_task_retries=0,
        ).remote(
            model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
            max_lora_rank=cfg.lora.rank, seed=cfg.seed, kv_cache_gib=cfg.rollout.kv_cache_gib,
            threads=cfg.rollout.threads_per_worker, worker_id=i,
        )
        for i, bundle in enumerate(placement.rollout)
    ]
    # Scoring is a pure function of the rollout: Ray itself re-runs a lost batch on the
    # restarted actor (max_task_retries); a reward that raises is not retried.
    reward_actors = [
        ray.remote(RewardWorker).options(
            num_cpus=cfg.reward.cpus_per_actor, scheduling_strategy=placement.strategy(bundle),
            name=f"lorafleet-reward-{i}", max_restarts=restarts, max_task_retries=restarts,
        ).remote(spec)
        for i, bundle in enumerate(placement.reward)
    ]
    # Surface construction errors (bad model path, vLLM start failure) before the loop.
    ray.get([w.__ray_ready__.remote() for w in [learner, *workers, *reward_actors]])
    return Fleet(cfg, placement, learner, workers, reward_actors, probe_ids)
