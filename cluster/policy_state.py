"""What the driver holds for each policy trained over the fleet, and how a run's policies are
made: one (named `policy`, writing the run directory itself) for a run without a `policies:`
section, else one per entry, each writing RUN/<name>/ as a single run would. Resuming puts every
policy back at the last checkpoint they all completed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..common.configio import ConfigError, save_config
from ..common.corpora import DatasetError
from ..common.data import PromptStream
from ..common.metrics import MetricsSink
from ..common.records import POLICY
from ..common.run_dir import RunDir
from ..reward.normalize import RunningMoments
from ..reward.scoring import Scorer
from .checkpoint import ResumeError, TrainerState, latest_checkpoint, rewind
from .config import TrainConfig
from .inputs import RunInputs, load_run_inputs
from .policies import expand_policies


@dataclass
class PolicyState:
    """One policy on the driver: its own config (the run's, with the policy's overrides), its
    inputs, its run directory, prompt stream, scorer (reward spec, failed-reward count, running
    reward statistics), metrics sink and evaluations. Its adapters, optimiser and version live
    on the learner, its adapter in one slot of every rollout worker."""

    name: str  # the adapter's name on the learner and its slot on the rollout workers
    cfg: TrainConfig
    inputs: RunInputs
    run_dir: RunDir
    stream: PromptStream
    sink: MetricsSink | None = None  # made once the run directory exists
    scorer: Scorer | None = None  # None: no stage generates, so no reward actors
    stage_evals: list[dict] = field(default_factory=list)
    moments: RunningMoments = field(default_factory=RunningMoments)  # a resumed run's
    stopped: str | None = None  # why it was stopped while the other policies went on
    resume_from: Path | None = None  # the checkpoint a resumed run continues it from


def policy_configs(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each policy: the run's `policies:`, or the run itself as `policy`."""
    return expand_policies(cfg) or [(POLICY, cfg)]


def load_policies(cfg: TrainConfig) -> list[PolicyState]:
    """Every policy's inputs, checked before any directory or actor is made; a policy's bad
    input names the policy. The policies must share one base model."""
    configs = policy_configs(cfg)
    policies = []
    for name, policy_cfg in configs:
        try:
            inputs = load_run_inputs(policy_cfg)
        except (ConfigError, DatasetError) as exc:
            if len(configs) == 1:
                raise
            raise type(exc)(f"policies[{name}]: {exc}") from exc
        if cfg.reward.model_on_learner and policy_cfg.reward.model != cfg.reward.model:
            raise ConfigError(f"policies[{name}]: reward.model differs from the run's, but "
                              "with reward.model_on_learner the learner holds one reward model")
        first = policies[0] if policies else None
        if first is not None and inputs.model_path != first.inputs.model_path:
            raise ConfigError(
                f"policies[{name}]: its base model is {inputs.model_path}, policy {first.name}'s "
                f"is {first.inputs.model_path} (model.name_or_path=tiny builds one per task): "
                "every policy trains on one base model")
        policies.append(PolicyState(name, policy_cfg, inputs, RunDir(policy_cfg.run_dir),
                                    PromptStream(inputs.train, policy_cfg.seed)))
    return policies


def place_policies(policies: list[PolicyState], root: RunDir, resume: bool, several: bool
                   ) -> None:
    """Each policy's directory: with a `policies:` section (`several`) RUN/<name>/, its
    config.yaml written there as a single run's; else the run's own. And its metrics sink."""
    for policy in policies:
        policy.run_dir = root.policy(policy.name) if several else root
        policy.cfg = replace(policy.cfg, run_dir=str(policy.run_dir))
        if several:
            if not resume:
                policy.run_dir.path.mkdir()
            save_config(policy.cfg, policy.run_dir.config)
        policy.sink = MetricsSink(policy.run_dir)


def resume_policies(policies: list[PolicyState], root: RunDir, several: bool
                    ) -> tuple[TrainerState, str]:
    """Rewinds every policy still training to the last checkpoint all of them completed (a
    stopped policy stays stopped, as its summary says) and sets its stream and statistics;
    returns that checkpoint's state (one of them) and its name. `several`: the config has a
    `policies:` section, which must name the policies the run trained."""
    on_disk = root.policy_names()
    named = sorted(p.name for p in policies) if several else []
    if on_disk != named:
        raise ResumeError(
            f"{root}: the run trained policies {on_disk}, the config names {named}; adding "
            "or removing a policy on resume is not supported: start a new run")
    for policy in policies:
        if policy.run_dir.summary.exists():
            policy.stopped = policy.run_dir.read_summary().get("stopped")
    live = [p for p in policies if p.stopped is None]
    if not live:
        raise ResumeError(f"{root}: every policy of the run had stopped; nothing to resume")
    common = min(latest_checkpoint(p.run_dir)[1].position for p in live)
    state = name = None
    for policy in live:
        directory, state = latest_checkpoint(policy.run_dir, at_most=common)
        if state.position != common:
            raise ResumeError(f"{policy.run_dir}: no checkpoint at stage {common[0] + 1}, "
                              f"iteration {common[1]}, where the other policies resume")
        rewind(policy.run_dir, state, directory)
        policy.stream.cursor = state.prompt_cursor
        policy.stage_evals = state.stage_evals
        policy.moments = RunningMoments(**state.reward_moments)
        policy.resume_from = directory
        name = directory.name
    return state, name
