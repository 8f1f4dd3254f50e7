"""Each actor's spec built from the run config, in one place: the learner's (LearnerSpec), the
rollout engines' (EngineSpec), the reward actors' (RewardSpec) and the fleet's actor groups
with their resources (GroupSpec); and the sync check's tolerance."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import replace

from ..common.devices import model_dtype
from ..common.run_dir import RunDir
from ..common.specs import EngineSpec, LearnerSpec, PolicySpec
from ..reward.pool import RewardSpec
from .actor_group import GroupSpec, Resources
from .config import TrainConfig


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

    reward = cfg.reward
    return RewardSpec(
        rules=reward_rules(cfg), rule_weight=reward.rule_weight, model=model,
        model_weight=reward.model_weight, threads=reward.threads_per_actor,
        skip_errors=reward.on_error == "skip", weights=tuple(reward.weights) or None,
        fn_settings=tuple(reward.fn_settings().items()), timeout_s=reward.timeout_s,
    )


def sync_tolerance(cfg: TrainConfig) -> float:
    if cfg.rollout.sync_tolerance is not None:
        return cfg.rollout.sync_tolerance
    dtypes = {model_dtype(cfg.model.dtype, gpus > 0)
              for gpus in (cfg.learner.num_gpus, cfg.rollout.num_gpus_per_worker)}
    return 1e-3 if dtypes == {"float32"} else 5e-2


def policy_spec(name: str, cfg: TrainConfig) -> PolicySpec:
    """Policy `name` of the learner from its own run config (`cfg`: the run's, or a policy's
    of a `policies:` run as expand_policies builds it)."""
    return PolicySpec(
        name=name, algo=cfg.algo, lora=cfg.lora, seed=cfg.seed,
        max_staleness=cfg.rollout.staleness_bound,
        max_behaviour_weight=cfg.rollout.max_behaviour_weight,
    )


def learner_spec(
    cfg: TrainConfig, model_path: str, pad_token_id: int,
    policies: list[tuple[str, TrainConfig]],
) -> LearnerSpec:
    """What the learner actor is built from (`model_path`: resolve_model's); `policies`: each
    policy's name and config (cluster/policy_state.py's policy_configs)."""
    return LearnerSpec(
        model_path=model_path, pad_token_id=pad_token_id,
        policies=tuple(policy_spec(name, policy_cfg) for name, policy_cfg in policies),
        stages=tuple(cfg.stages), dtype=cfg.model.dtype, threads=cfg.learner.threads,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.learner.gradient_checkpointing,
        autocast=cfg.learner.autocast, compile=cfg.learner.compile,
        max_tokens_per_pass=cfg.learner.max_tokens_per_pass,
    )


def engine_spec(
    cfg: TrainConfig, model_path: str, served_levels: int = 0,
    policies: Collection[TrainConfig] = (),
) -> EngineSpec:
    """What each rollout worker's engine is built from; it serves the policy and
    `served_levels` meet level adapters at once, or each of `policies` (their configs)."""
    rollout = cfg.rollout
    ranks = [cfg.served_lora_rank, *(policy.lora.rank for policy in policies)]
    return EngineSpec(
        model_path=model_path, max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype,
        max_lora_rank=max(ranks), seed=cfg.seed, kv_cache_gib=rollout.kv_cache_gib,
        threads_per_worker=rollout.threads_per_worker,
        tensor_parallel_size=rollout.tensor_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        max_loras=max(1 + served_levels, len(policies)),
        prompt_embeds=cfg.serves_soft_prompts,
    )


def run_specs(cfg: TrainConfig, policies: list) -> tuple[LearnerSpec, EngineSpec]:
    """The learner's and the rollout engines' specs of a run of `policies` (policy_state's
    PolicyStates; the first's inputs name the model): what its fleet is built from."""
    inputs = policies[0].inputs
    return (learner_spec(cfg, inputs.model_path, inputs.pad_token_id,
                         [(p.name, p.cfg) for p in policies]),
            engine_spec(cfg, inputs.model_path, inputs.served_levels, [p.cfg for p in policies]))


def learner_engine(cfg: TrainConfig, engine: EngineSpec) -> EngineSpec | None:
    """The engine in the learner's own actor when it is colocated (the rollout workers' with
    the learner's threads), else None."""
    if not colocated(cfg):
        return None
    return replace(engine, threads_per_worker=cfg.learner.threads, colocated=True)


def fixed_cluster(cfg: TrainConfig) -> bool:
    """A local cluster (no address to join): no autoscaler will add what is missing."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def generates(cfg: TrainConfig) -> bool:
    """A stage samples from the policy (an rm stage alone trains on preference pairs)."""
    return any(stage != "rm" for stage in cfg.stages)


def colocated(cfg: TrainConfig) -> bool:
    """Whether the learner and rollout worker 0 share one actor (placement.colocate, checked
    at load by TrainConfig.validate; "auto": on a local cluster without GPUs, where they would
    share one machine's cores anyway)."""
    colocate = cfg.placement.colocate
    gpus = cfg.learner.num_gpus or cfg.rollout.num_gpus_per_worker
    return colocate == "on" or (colocate == "auto" and generates(cfg) and fixed_cluster(cfg)
                                and not gpus)


def rollout_workers(cfg: TrainConfig) -> int:
    """The run's vLLM engines (the colocated one included): rollout.num_workers, by default
    1 beside a colocated learner and 2 apart; none when no stage generates."""
    if not generates(cfg):
        return 0
    if cfg.rollout.num_workers is not None:
        return cfg.rollout.num_workers
    return 1 if colocated(cfg) else 2


def placement_label(cfg: TrainConfig) -> str:
    """How the run places its actors, as the run prints it."""
    workers = rollout_workers(cfg)
    if colocated(cfg):
        others = f" + {workers - 1} rollout worker(s)" if workers > 1 else ""
        return (f"learner + engine colocated in one actor{others} (placement.colocate="
                f"{cfg.placement.colocate})")
    return f"learner + {workers} rollout worker(s), each its own actor (placement.colocate=" \
        f"{cfg.placement.colocate})"


def role_resources(
    prefix: str, cpus: tuple[str, float], gpus: tuple[str, float], custom: tuple[str, dict]
) -> tuple[Resources, dict[str, str]]:
    """An actor's bundle from its config keys (name, value), and which key asks for what."""
    keys = {"CPU": f"{prefix}.{cpus[0]}", "GPU": f"{prefix}.{gpus[0]}"}
    keys |= {name: f"{prefix}.{custom[0]}.{name}" for name in custom[1]}
    return Resources(cpus[1], gpus[1], dict(custom[1])), keys


def group_specs(cfg: TrainConfig) -> list[GroupSpec]:
    """The learner, the rollout workers and the reward actors; the last two only when a stage
    generates. Colocated, the learner's actor also holds rollout worker 0 (its bundle adds a
    worker's CPUs), and the rollout group starts the others."""
    from ..learner.actor import Learner
    from ..reward.pool import RewardWorker
    from ..rollout.worker import AdapterMissing, RolloutWorker
    from .colocated import ColocatedLearner

    together = colocated(cfg)
    workers = rollout_workers(cfg) - together
    restarts = cfg.ray.max_actor_restarts
    learner, rollout, reward = cfg.learner, cfg.rollout, cfg.reward
    cpus = learner.cpus + rollout.cpus_per_worker if together else learner.cpus
    cpus_key = "cpus + rollout.cpus_per_worker" if together else "cpus"
    return [
        # The learner holds the only copy of the training state: no restart (resume from the
        # last checkpoint instead); rollout and reward actors are stateless and restart.
        GroupSpec("learner", ColocatedLearner if together else Learner, 1, *role_resources(
            "learner", (cpus_key, cpus), ("num_gpus", learner.num_gpus),
            ("resources", learner.resources)), "lorafleet-learner"),
        # A worker's bundle holds all its engine's GPUs (tensor_parallel_size of them), so
        # they sit on one node and vLLM shards over the worker's own CUDA_VISIBLE_DEVICES.
        GroupSpec("rollout", RolloutWorker, workers, *role_resources(
                      "rollout", ("cpus_per_worker", rollout.cpus_per_worker),
                      ("num_gpus_per_worker", rollout.num_gpus_per_worker),
                      ("resources_per_worker", rollout.resources_per_worker)),
                  "lorafleet-rollout-{i}", max_restarts=restarts, index_kwarg="worker_id",
                  lost_state=(AdapterMissing,),
                  call_timeout=("rollout.call_timeout_s", rollout.call_timeout_s)),
        # Scoring is a pure function of the rollout: the reward pool sends a lost batch again
        # to the restarted actor (reward/pool.py); a reward that raises is not retried.
        GroupSpec("reward", RewardWorker, reward.num_actors if generates(cfg) else 0,
                  *role_resources(
                      "reward", ("cpus_per_actor", reward.cpus_per_actor),
                      ("num_gpus_per_actor", reward.num_gpus_per_actor),
                      ("resources_per_actor", reward.resources_per_actor)),
                  "lorafleet-reward-{i}", max_restarts=restarts),
    ]
