"""The rl stage's updater, one for every algorithm: stale-rollout refusal, the old and reference
log-probs of a batch, epochs of shuffled minibatches, each one policy step accumulated over
micro-batches, then the value model's step where the algorithm fits one. What makes it PPO,
GRPO, RLOO, SPR or best-of-N is the batch's objective (objectives.py), picked by algo.name."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common.records import ScoredRollout, TrainStats
from ..common.specs import PolicySpec
from .algorithms.off_policy import behaviour_weights, weighted_token_mean
from .algorithms.ppo import kl_penalty, masked_mean
from .algorithms.registry import AlgoConfig, objective_function
from .core import LearnerCore, SyncError, padded
from .model import TokenBatch, collate_scored

# (micro-batch, its row indices in the batch) -> (loss, metrics)
MicroLoss = Callable[[TokenBatch, Tensor], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class BatchContext:
    """A scored batch as the learner sees it before any update (all tensors detached)."""

    scored: list[ScoredRollout]
    batch: TokenBatch
    scores: Tensor  # [B]
    # [B, T], the learner's own (exact for importance ratios): from a forward pass before the
    # update, or, when the update is one step on the whole batch, from that step's own pass
    old_logp: Tensor
    old_logp_from_update: bool
    # [B, T] decoupled PPO's truncated pi_old / pi_vllm per token (off_policy.py); the mask
    # itself when every sample is on-policy (rollout.mode=sync)
    behaviour_weights: Tensor
    ref_logp: Tensor | None  # [B, T], adapters disabled; None when the algorithm needs none
    vllm_logp: Tensor  # [B, T], what the rollout engine reported while sampling

    def old_logp_of(self, rows: Tensor, logp: Tensor) -> Tensor:
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

    def __init__(self, rl: RLUpdater, lr: float) -> None:
        self.rl = rl
        self.params = rl.core.net.adapter_parameters(rl.core.value_name)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0)

    def values(self, batch: TokenBatch) -> Tensor:
        """V(state before response token k) ([B, T])."""
        return self.rl.core.values(batch)

    def prompt_values(self, batch: TokenBatch) -> Tensor:
        """V(x): the value at the position that predicts the first response token ([B])."""
        return self.values(batch)[:, 0]

    def step(self, loss: Tensor) -> Tensor:
        return self.rl.core.step(loss, self.params, self.opt)

    def accumulated_step(self, batch: TokenBatch, chunk: Tensor,
                         loss_of: MicroLoss) -> dict[str, Tensor]:
        return self.rl.accumulated_step(batch, chunk, loss_of, self.params, self.opt, "tokens")


class RLUpdater:
    def __init__(self, core: LearnerCore, policy: PolicySpec) -> None:
        """Policy `policy`'s updater (its algorithm, seed, staleness bound), on `core`, the
        policy's. policy.max_staleness: how many versions behind the policy a rollout's adapter
        may be (0: on-policy only, no behaviour weights). The policy's value adapter must
        already be on the net where its algorithm fits one (algo.value_model)."""
        algo: AlgoConfig = policy.algo
        self.core, self.algo = core, algo
        self.objective = objective_function(algo)
        self.value = ValueModel(self, algo.value_lr) if algo.value_model else None
        self.generator = torch.Generator().manual_seed(policy.seed)  # the minibatch shuffle
        self.max_staleness = policy.max_staleness
        self.max_behaviour_weight = policy.max_behaviour_weight

    def train_step(self, scored: list[ScoredRollout], version: int) -> TrainStats:
        """One update of the policy at `version` on rollouts of at most max_staleness versions
        before it."""
        start = time.perf_counter()
        ctx = self.prepare(scored, version)
        objective = self.objective(self, ctx)

        def loss_of(mb, rows):
            logp, entropy = self.core.logprobs(mb, with_entropy=True)
            loss, metrics = objective.loss(mb, rows, logp, ctx.old_logp_of(rows, logp))
            return loss, {"entropy": masked_mean(entropy, mb.mask), **metrics}

        totals: dict[str, float] = {}
        for chunk in self.minibatches(len(scored)):
            step = self.accumulated_step(ctx.batch, chunk, loss_of, self.core.policy_params,
                                         self.core.policy_opt, objective.averaged_over)
            # the objective's own "policy_loss" (PPO: without the KL term), else the loss
            metrics = {"policy_loss": step.pop("loss"), **step}
            if objective.value_step is not None:
                metrics |= objective.value_step(chunk)
            accumulate(totals, metrics)
        count = totals.pop("_count")
        return TrainStats(
            adapter_version=version, kl=ctx.kl, logprob_diff_vllm=ctx.logprob_gap,
            train_seconds=time.perf_counter() - start,
            **{key: value / count for key, value in totals.items()}, **objective.metrics,
        )

    @torch.no_grad()
    def prepare(self, scored: list[ScoredRollout], version: int) -> BatchContext:
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
        net, algo = self.core.net, self.algo
        batch = collate_scored(scored, self.core.pad_id, net.device)
        # one on-policy step on the whole batch: the update's own pass gives the old log-probs
        # (decoupled PPO's proximal policy needs them first, so never under async)
        one_step = (algo.epochs == 1 and algo.minibatch_size >= len(scored)
                    and not algo.needs_old_logp_first and self.max_staleness == 0)
        with self.core.autocast():
            old_logp = torch.zeros_like(batch.mask) if one_step else self.core.logprobs(batch)
            ref_logp = net.reference_logprobs(batch) if algo.uses_reference else None
        vllm_logp = padded([s.rollout.logprobs for s in scored], batch)
        weights = batch.mask if self.max_staleness == 0 else behaviour_weights(
            old_logp, vllm_logp, batch.mask, self.max_behaviour_weight)
        return BatchContext(
            scored=scored, batch=batch,
            scores=torch.tensor([s.reward for s in scored], device=batch.mask.device),
            old_logp=old_logp, old_logp_from_update=one_step, behaviour_weights=weights,
            ref_logp=ref_logp, vllm_logp=vllm_logp,
        )

    def minibatches(self, size: int):
        """`epochs` shuffled passes of row-index chunks."""
        for _ in range(self.algo.epochs):
            yield from torch.randperm(size, generator=self.generator).split(
                self.algo.minibatch_size
            )

    def micro_batches(self, batch: TokenBatch, chunk: Tensor,
                      averaged_over: str) -> list[tuple[Tensor, float]]:
        """Minibatch rows `chunk` as micro-batches of at most algo.max_tokens_per_microbatch
        tokens (rows x the batch's padded length), each with its share of the minibatch: of
        its rows or of its tokens, as the loss averages over `averaged_over`."""
        budget = self.algo.max_tokens_per_microbatch
        if budget is None:
            return [(chunk, 1.0)]
        parts = chunk.split(max(1, budget // batch.input_ids.shape[1]))
        if averaged_over == "rows":
            return [(rows, len(rows) / len(chunk)) for rows in parts]
        tokens = batch.mask[chunk].sum()
        return [(rows, float(batch.mask[rows].sum() / tokens)) for rows in parts]

    def accumulated_step(
        self, batch: TokenBatch, chunk: Tensor, loss_of: MicroLoss, params: list,
        optimizer: torch.optim.Optimizer, averaged_over: str,
    ) -> dict[str, Tensor]:
        """One optimiser step on minibatch rows `chunk`, its gradient accumulated over
        `micro_batches` weighted by their shares. Returns the metrics weighted alike, with the
        loss as "loss" and the step's "grad_norm"."""
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        for rows, share in self.micro_batches(batch, chunk, averaged_over):
            with self.core.autocast():
                loss, metrics = loss_of(batch.select(rows), rows)
            (loss * share).backward()
            for key, value in {"loss": loss, **metrics}.items():
                value = share * value.detach()
                totals[key] = totals[key] + value if key in totals else value
        self.core.check_finite("loss", totals["loss"])
        totals["grad_norm"] = self.core.clip_and_step(params, optimizer)
        return totals


def accumulate(totals: dict[str, float], step: dict[str, Tensor]) -> None:
    """Running sums of per-minibatch metrics; `_count` counts minibatches."""
    for key, value in step.items():
        totals[key] = totals.get(key, 0.0) + float(value.detach())
    totals["_count"] = totals.get("_count", 0.0) + 1


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
