"""The rl stage's update, one for every algorithm and for any number of policies at once: each
policy's batch is checked (its own rollouts, none stale), its old, reference and value passes
run jointly with the others' (no gradients), its objective turns it into advantages or sample
weights, and then minibatch k of every policy trains in one joint step (joint.py: one
forward/backward, each adapter its own loss, clipping and optimiser), followed by the joint
step of the value adapters where an algorithm fits one. What makes it PPO, GRPO, RLOO, SPR or
best-of-N is the policy's objective (objectives.py), picked by its algo.name; one policy is
the case of one."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common.records import ScoredRollout, TrainStats, UpdateDiverged
from ..common.specs import PolicySpec
from .algorithms.off_policy import behaviour_weights, weighted_token_mean
from .algorithms.ppo import kl_penalty, masked_mean
from .algorithms.registry import AlgoConfig, objective_function
from .core import LearnerCore, SyncError, padded
from .joint import HEAD, LM, AdapterStep, joint_forward, joint_step
from .model import TokenBatch, collate_scored


@dataclass
class BatchContext:
    """A scored batch as the learner sees it before any update (all tensors detached)."""

    scored: list[ScoredRollout]
    batch: TokenBatch
    scores: Tensor  # [B]
    vllm_logp: Tensor  # [B, T], what the rollout engine reported while sampling
    # the update is one on-policy step on the whole batch: its own pass gives the old
    # log-probs (decoupled PPO's proximal policy needs them first, so never under async)
    old_logp_from_update: bool
    # [B, T], the learner's own (exact for importance ratios): from the joint pass before the
    # update, or, in a one-step update, recorded from that step's own pass
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None  # [B, T], adapters disabled; None when the algorithm needs none
    old_values: Tensor | None = None  # [B, T], the value adapter's before the update, if any
    # [B, T] decoupled PPO's truncated pi_old / pi_vllm per token (off_policy.py); the mask
    # itself when every sample is on-policy (rollout.mode=sync)
    behaviour_weights: Tensor | None = None

    def record_old_logp(self, rows: Tensor, logp: Tensor) -> Tensor:
        """The old log-probs of batch `rows`, whose current log-probs are `logp`. In a one-step
        update they are `logp` itself, detached (the ratio is 1 by construction, as in TRL's
        GRPO), recorded here for the metrics."""
        if self.old_logp_from_update:
            self.old_logp[rows] = logp.detach()
        return self.old_logp[rows]

    def rewards_by_prompt(self) -> Tensor:
        """[prompts, n] view of the scores, for the group-based algorithms."""
        return group_rewards(self.scored).to(self.scores.device)

    @property
    def logprob_gap(self) -> float:
        """Mean |old_logp - vLLM logprob| over response tokens."""
        return float(masked_mean((self.old_logp - self.vllm_logp).abs(), self.batch.mask))

    @property
    def kl(self) -> float | None:
        """Per-token k3 KL(learner || reference), on the batch's samples weighted by their
        behaviour weights (all 1 on-policy)."""
        if self.ref_logp is None:
            return None
        kl = kl_penalty(self.old_logp, self.ref_logp, "k3")
        return float(weighted_token_mean(kl, self.behaviour_weights, self.batch.mask))


class ValueModel:
    """The value adapter + scalar head and its optimiser: PPO's critic, SPR's learned
    normaliser."""

    def __init__(self, core: LearnerCore, lr: float) -> None:
        self.name = core.value_name
        self.params = core.net.adapter_parameters(self.name)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0)


class RLUpdater:
    def __init__(self, core: LearnerCore, policy: PolicySpec) -> None:
        """Policy `policy`'s updater (its algorithm, seed, staleness bound), on `core`, the
        policy's. policy.max_staleness: how many versions behind the policy a rollout's adapter
        may be (0: on-policy only, no behaviour weights). The policy's value adapter must
        already be on the net where its algorithm fits one (algo.value_model)."""
        algo: AlgoConfig = policy.algo
        self.core, self.algo = core, algo
        self.objective = objective_function(algo)
        self.value = ValueModel(core, algo.value_lr) if algo.value_model else None
        self.generator = torch.Generator().manual_seed(policy.seed)  # the minibatch shuffle
        self.max_staleness = policy.max_staleness
        self.max_behaviour_weight = policy.max_behaviour_weight

    @torch.no_grad()
    def prepare(self, scored: list[ScoredRollout], version: int) -> BatchContext:
        """The batch collated, once it is checked to hold the policy's own rollouts of at most
        max_staleness versions before `version`; its passes are still to run."""
        name = self.core.name
        others = [s.rollout for s in scored if s.rollout.policy != name]
        if others:
            r = others[0]
            raise SyncError(
                f"{len(others)} rollouts were sampled by policy {r.policy!r} ({r.sample_id} on "
                f"worker {r.worker_id}), not by {name!r}: a policy trains on its own rollouts only"
            )
        stale = [s.rollout for s in scored
                 if not 0 <= version - s.rollout.adapter_version <= self.max_staleness]
        if stale:
            r = stale[0]
            raise SyncError(
                f"{len(stale)} rollouts are stale (more than {self.max_staleness} versions "
                f"behind): {r.sample_id} came from adapter v{r.adapter_version} on worker "
                f"{r.worker_id}, learner is at v{version}"
            )
        algo = self.algo
        batch = collate_scored(scored, self.core.pad_id, self.core.net.device)
        return BatchContext(
            scored=scored, batch=batch,
            scores=torch.tensor([s.reward for s in scored], device=batch.mask.device),
            vllm_logp=padded([s.rollout.logprobs for s in scored], batch),
            old_logp_from_update=(algo.epochs == 1 and algo.minibatch_size >= len(scored)
                                  and not algo.needs_old_logp_first and self.max_staleness == 0),
        )

    def passes(self, ctx: BatchContext) -> list[tuple[str, str, str | list[str]]]:
        """The no-gradient passes the batch needs before its update: (field of ctx, head kind
        read, adapters)."""
        needed = []
        if not ctx.old_logp_from_update:
            needed.append(("old_logp", LM, self.core.adapter))
        if self.algo.uses_reference:
            needed.append(("ref_logp", LM, []))
        if self.value is not None:
            needed.append(("old_values", HEAD, self.value.name))
        return needed

    def finish_passes(self, ctx: BatchContext) -> None:
        if ctx.old_logp is None:
            ctx.old_logp = torch.zeros_like(ctx.batch.mask)
        ctx.behaviour_weights = ctx.batch.mask if self.max_staleness == 0 else behaviour_weights(
            ctx.old_logp, ctx.vllm_logp, ctx.batch.mask, self.max_behaviour_weight)

    def minibatches(self, size: int) -> list[Tensor]:
        """`epochs` shuffled passes of row-index chunks."""
        return [chunk for _ in range(self.algo.epochs)
                for chunk in torch.randperm(size, generator=self.generator).split(
                    self.algo.minibatch_size)]

    def steps(self, ctx: BatchContext, objective, chunk: Tensor) -> list[AdapterStep]:
        """Minibatch `chunk`'s policy step and, where the algorithm fits one, its value step."""
        core, budget = self.core, self.algo.max_tokens_per_microbatch

        def policy_loss(mb, rows, out):
            logp, entropy = out
            loss, metrics = objective.loss(mb, rows, logp, ctx.record_old_logp(rows, logp))
            return loss, {"entropy": masked_mean(entropy, mb.mask), **metrics}

        steps = [AdapterStep(core.name, core.adapter, LM, ctx.batch, chunk, policy_loss, core,
                             core.policy_params, core.policy_opt, objective.averaged_over,
                             budget)]
        if objective.value_loss is not None:
            value = self.value
            steps.append(AdapterStep(core.name, value.name, HEAD, ctx.batch, chunk,
                                     objective.value_loss, core, value.params, value.opt,
                                     objective.value_averaged_over, budget))
        return steps


def run_passes(work: list[tuple[RLUpdater, BatchContext]]) -> None:
    """Every batch's no-gradient passes, one joint pass per head kind over all of them."""
    core = work[0][0].core
    for reads in (LM, HEAD):
        wanted = [(ctx, field, adapters) for rl, ctx in work
                  for field, kind, adapters in rl.passes(ctx) if kind == reads]
        if not wanted:
            continue
        with torch.no_grad(), core.autocast():
            outputs = joint_forward(core.net, [(ctx.batch, adapters) for ctx, _, adapters
                                               in wanted], reads, core.pad_id)
        for (ctx, field, _), (out,) in zip(wanted, outputs, strict=True):
            setattr(ctx, field, out.float())
    for rl, ctx in work:
        rl.finish_passes(ctx)


def train_together(work: list[tuple[RLUpdater, list[ScoredRollout], int]],
                   max_tokens_per_pass: int | None = None
                   ) -> dict[str, TrainStats | UpdateDiverged]:
    """One RL update of each policy of `work` ((updater, its batch, its version)), in joint
    steps: minibatch k of every policy that has one in one step, then their value adapters'.
    A policy whose step diverges stops there (its earlier steps stay applied, its version does
    not move) and gets its UpdateDiverged; the others go on. SyncError, before anything
    trains, for a batch holding another policy's or stale rollouts. `max_tokens_per_pass`:
    joint_step's."""
    start = time.perf_counter()
    contexts = [(rl, rl.prepare(scored, version)) for rl, scored, version in work]
    run_passes(contexts)
    core = work[0][0].core
    plans = [(rl, ctx, rl.objective(rl, ctx), rl.minibatches(len(ctx.scored)))
             for rl, ctx in contexts]
    versions = {rl.core.name: version for rl, _, version in work}
    totals: dict[str, dict[str, float]] = {name: {} for name in versions}
    failed: dict[str, UpdateDiverged] = {}
    for k in range(max(len(chunks) for *_, chunks in plans)):
        steps = [rl.steps(ctx, objective, chunks[k]) for rl, ctx, objective, chunks in plans
                 if k < len(chunks) and rl.core.name not in failed]
        for kind in range(2):  # every policy step first, then the value steps
            here = [own[kind] for own in steps if len(own) > kind
                    and own[kind].owner not in failed]
            failed |= joint_step(core.net, here, core.pad_id, core.autocast,
                                 max_tokens_per_pass)
            for step in here:
                if step.owner not in failed:
                    accumulate(totals[step.owner], step_metrics(step, kind))
    seconds = time.perf_counter() - start
    results: dict[str, TrainStats | UpdateDiverged] = dict(failed)
    for rl, ctx, objective, _ in plans:
        name = rl.core.name
        if name in failed:
            continue
        count = totals[name].pop("_count")
        results[name] = TrainStats(
            adapter_version=versions[name], kl=ctx.kl, logprob_diff_vllm=ctx.logprob_gap,
            train_seconds=seconds, **{key: value / count for key, value in totals[name].items()},
            **objective.metrics,
        )
    return results


def step_metrics(step: AdapterStep, kind: int) -> dict[str, Tensor]:
    """A policy step's metrics as TrainStats names them (the objective's own "policy_loss",
    PPO's without the KL term, in place of the loss), or a value step's."""
    totals = dict(step.totals)
    loss, grad_norm = totals.pop("loss"), totals.pop("grad_norm")
    if kind == 0:
        return {"policy_loss": loss, "grad_norm": grad_norm, **totals, "_count": 1}
    return {"value_loss": loss, **totals}


def accumulate(totals: dict[str, float], step: dict[str, Tensor]) -> None:
    """Running sums of per-minibatch metrics; `_count` counts minibatches."""
    for key, value in step.items():
        totals[key] = totals.get(key, 0.0) + float(value)


def group_rewards(scored: list[ScoredRollout]) -> Tensor:
    """[prompts, n] view of the scores; the batch must hold each prompt's n samples in a row."""
    n = 1
    while n < len(scored) and scored[n].rollout.prompt.index == scored[0].rollout.prompt.index:
        n += 1
    if len(scored) % n:
        raise ValueError(f"{len(scored)} rollouts do not split into groups of {n} per prompt")
    for start in range(0, len(scored), n):
        group = scored[start : start + n]
        if [s.rollout.sample_index for s in group] != list(range(n)) or len(
            {s.rollout.prompt.index for s in group}
        ) != 1:
            raise ValueError(
                f"rollouts {start}..{start + n - 1} are not the {n} samples of one prompt in "
                "order; group-based algorithms need prompt-major batches"
            )
    return torch.tensor([s.reward for s in scored]).view(-1, n)
