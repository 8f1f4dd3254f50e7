"""Where a run reports besides metrics.jsonl: Ray dashboard metrics (Prometheus; a run's and
`lorafleet serve`'s), wandb, and a Parquet log of every rollout."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..common.configio import ConfigError, to_dict
from ..common.records import ScoredRollout
from ..common.run_dir import RunDir

STEP_SECONDS_BOUNDARIES = [0.5, 1, 2, 4, 8, 16, 32, 64, 128]


class DashboardMetrics:
    """`ray.util.metrics` series, exported by every Ray node's metrics agent (Prometheus
    format, names prefixed `ray_`); the Ray dashboard's Grafana panels can chart them."""

    def __init__(self, run_name: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"run": run_name}

        def gauge(name: str, doc: str, keys: tuple[str, ...] = ()) -> Gauge:
            metric = Gauge(f"lorafleet_{name}", doc, tag_keys=("run", *keys))
            metric.set_default_tags(tags)
            return metric

        # each policy's series carry its name (tag `policy`; a single policy's is "policy")
        self.tokens_per_s = gauge("rollout_tokens_per_s", "generated tokens/s, last iteration",
                                  ("policy",))
        self.in_flight = gauge("samples_in_flight", "samples requested, not yet returned")
        self.reward_mean = gauge("reward_mean", "mean reward of the last iteration's samples",
                                 ("policy",))
        self.kl = gauge("kl", "per-token KL(policy || reference), last iteration", ("policy",))
        self.version = gauge("adapter_version", "adapter version each worker serves",
                             ("worker", "policy"))
        self.version_lag = gauge(
            "adapter_version_lag", "learner version minus the worker's", ("worker", "policy")
        )
        self.reward_queue = gauge("reward_queue_depth", "reward batches waiting to be scored")
        self.samples = Counter("lorafleet_samples_total", "samples generated",
                               tag_keys=("run", "policy"))
        self.samples.set_default_tags(tags)
        self.restarts = Counter(
            "lorafleet_actor_restarts_total", "actor restarts handled", tag_keys=("run", "role")
        )
        self.restarts.set_default_tags(tags)
        self.step_seconds = Histogram(
            "lorafleet_learner_step_seconds", "learner update time", STEP_SECONDS_BOUNDARIES,
            tag_keys=("run", "policy"),
        )
        self.step_seconds.set_default_tags(tags)

    def restarted(self, role: str) -> None:
        self.restarts.inc(tags={"role": role})

    def worker_versions(self, versions: dict[int, int], learner_version: int,
                        policy: str) -> None:
        for worker, version in versions.items():
            tags = {"worker": str(worker), "policy": policy}
            self.version.set(version, tags=tags)
            self.version_lag.set(learner_version - version, tags=tags)

    def iteration(self, row: dict, policy: str) -> None:
        tags = {"policy": policy}
        self.tokens_per_s.set(row["rollout_tokens_per_s"], tags=tags)
        self.reward_mean.set(row["reward_mean"], tags=tags)
        if row["kl"] is not None:  # None: no reference pass (kl_coef 0)
            self.kl.set(row["kl"], tags=tags)
        self.samples.inc(row["samples"], tags=tags)
        self.step_seconds.observe(row["train_seconds"], tags=tags)


class ServeMetrics:
    """`lorafleet serve`'s figures as dashboard gauges, `lorafleet_serve_<figure>` (the
    TinkerService's status: sessions, training clients, samplers, and its request counts)."""

    def __init__(self, run_name: str, figures: list[str]) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {}
        for name in figures:
            self.gauges[name] = Gauge(f"lorafleet_serve_{name}", f"lorafleet serve: {name}",
                                      tag_keys=("run",))
            self.gauges[name].set_default_tags({"run": run_name})

    def update(self, status: dict[str, float]) -> None:
        for name, value in status.items():
            self.gauges[name].set(value)


class WandbLogger:
    def __init__(self, cfg, run_dir: RunDir) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logging.wandb=true needs wandb: pip install 'lorafleet[wandb]'"
            ) from None
        # No key and no login: record offline under RUN_DIR/wandb (`wandb sync` uploads later).
        stored_key = getattr(getattr(wandb, "api", None), "api_key", None)
        logged_in = bool(os.environ.get("WANDB_API_KEY") or stored_key)
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
        self.run = wandb.init(
            project=cfg.logging.wandb_project, name=run_dir.path.name, config=to_dict(cfg),
            dir=str(run_dir), mode=mode, resume="allow", id=f"{run_dir.path.name}-{cfg.seed}",
        )

        self.step = -1

    def log(self, row: dict, step: int, policy: str | None = None) -> None:
        """`policy`: with several policies in one run, each one's keys under its name."""
        # wandb steps must increase; evaluation rows share their adapter version's step.
        self.step = max(self.step, step)
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float)}
        prefix = f"{policy}/" if policy else ""
        self.run.log({f"{prefix}{row.get('stage', 'rl')}/{k}": v for k, v in scalars.items()},
                     step=self.step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # wandb's background service outlives finish(); a run (and `lorafleet compare`'s many
        # runs in one process) should leave nothing running behind it.
        wandb.teardown()


def write_rollouts(
    run_dir: RunDir, stage_index: int, iteration: int, scored: list[ScoredRollout]
) -> Path:
    """One Parquet file per iteration (a crashed run leaves whole files; resume drops the
    ones after its checkpoint). `columns` is the prompt row's other columns as JSON (ground
    truth, data_source, ...), `reward_parts` each reward function's value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{
        "iteration": iteration, "prompt_index": s.rollout.prompt.index,
        "prompt": s.rollout.prompt.text, "sample_index": s.rollout.sample_index,
        "response": s.rollout.response_text, "reward": s.reward,
        "adapter_version": s.rollout.adapter_version, "worker_id": s.rollout.worker_id,
        "finish_reason": s.rollout.finish_reason, "response_tokens": len(s.rollout.response_ids),
        "columns": json.dumps(s.rollout.prompt.columns, default=str),
        "reward_parts": json.dumps(s.rule_parts),
    } for s in scored]
    path = run_dir.rollout_file(stage_index, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
