"""Critic-free learners on the same actors: GRPO and RLOO (group baselines on the clipped
objective) and SPR / best-of-N SFT (re-weighted supervised learning). None of them carries a
value adapter; SPR and best-of-N need no reference either (its KL is only logged)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..common.records import ScoredRollout, TrainStats
from .actor import Learner
from .algorithms.critic_free import (
    awr_weights,
    best_of_n_weights,
    grpo_advantages,
    rloo_advantages,
    sequence_advantage_loss,
    spr_weights,
    weighted_nll,
)
from .algorithms.ppo import kl_penalty, masked_mean
from .base import BatchContext, accumulate
from .model import TokenBatch

# (minibatch, its row indices, its policy log-probs, their old log-probs) -> (loss, metrics)
Objective = Callable[[TokenBatch, Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


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


class CriticFreeLearner(Learner):
    """One update loop for the critic-free algorithms; `objective` is each one's loss."""

    def train_step(self, scored: list[ScoredRollout]) -> TrainStats:
        start = time.perf_counter()
        ctx = self.prepare(scored)
        objective, extra = self.objective(ctx, group_rewards(scored).to(ctx.scores.device))

        def loss_of(mb, rows):
            logp, entropy = self.net.logprobs(mb, with_entropy=True)
            loss, metrics = objective(mb, rows, logp, ctx.old_logp_of(rows, logp))
            return loss, {"entropy": masked_mean(entropy, mb.mask), **metrics}

        totals: dict[str, float] = {}
        for chunk in self.minibatches(len(scored)):
            step = self.accumulated_step(
                ctx.batch, chunk, loss_of, self.policy_params, self.policy_opt)
            accumulate(totals, {
                "policy_loss": step.pop("loss"), **step,
                **self.fit_normalizer(ctx.batch.select(chunk), ctx.scores[chunk]),
            })
        return self.finish(ctx, totals, start, **extra)

    def objective(self, ctx: BatchContext, rewards: Tensor) -> tuple[Objective, dict[str, float]]:
        """The minibatch loss `(mb, chunk, logp, old_logp) -> (loss, metrics)` for this batch,
        and per-update metrics; rewards: [prompts, n]."""
        raise NotImplementedError

    def fit_normalizer(self, mb: TokenBatch, rewards: Tensor) -> dict[str, Tensor]:
        """Hook for a learned normaliser's regression step; the others have none."""
        return {}


class GroupBaselineLearner(CriticFreeLearner):
    """GRPO / RLOO: a per-sample advantage from the prompt's group on the clipped objective."""

    def advantages(self, rewards: Tensor) -> Tensor:
        """[prompts, n] -> [prompts, n]."""
        raise NotImplementedError

    def objective(self, ctx: BatchContext, rewards: Tensor) -> tuple[Objective, dict[str, float]]:
        algo = self.algo
        if algo.needs_old_logp_first:  # RLOO-style: the sequence KL lowers the score
            seq_kl = (kl_penalty(ctx.old_logp, ctx.ref_logp, "k1") * ctx.batch.mask).sum(-1)
            rewards = rewards - algo.kl_coef * seq_kl.view_as(rewards)
        advantages = self.advantages(rewards).reshape(-1)

        def objective(mb, chunk, logp, old_logp):
            loss, clip_frac, approx_kl = sequence_advantage_loss(
                logp, old_logp, advantages[chunk], mb.mask, algo.clip_eps,
                ctx.behaviour_weights[chunk],
            )
            loss = self.with_kl_loss(loss, logp, ctx, chunk, mb.mask)
            return loss, {"clip_fraction": clip_frac, "approx_kl": approx_kl}

        return objective, {}


class GRPOLearner(GroupBaselineLearner):
    def advantages(self, rewards: Tensor) -> Tensor:
        return grpo_advantages(rewards, scale_by_std=self.algo.scale_by_std)


class RLOOLearner(GroupBaselineLearner):
    def advantages(self, rewards: Tensor) -> Tensor:
        return rloo_advantages(rewards)


class WeightedSFTLearner(CriticFreeLearner):
    """SPR / best-of-N: the samples' log-likelihood, weighted per sample."""

    averaged_over = "rows"  # weighted_nll: a mean over samples

    def sample_weights(self, ctx: BatchContext, rewards: Tensor) -> Tensor:
        """Weights per sample ([batch], prompt-major); rewards: [prompts, n]."""
        raise NotImplementedError

    def objective(self, ctx: BatchContext, rewards: Tensor) -> tuple[Objective, dict[str, float]]:
        weights = self.sample_weights(ctx, rewards)
        length_normalize = self.algo.length_normalize

        def objective(mb, chunk, logp, old_logp):
            return weighted_nll(logp, mb.mask, weights[chunk], length_normalize), {}

        return objective, {"weight_max": float(weights.max())}


class BestOfNLearner(WeightedSFTLearner):
    def sample_weights(self, ctx: BatchContext, rewards: Tensor) -> Tensor:
        return best_of_n_weights(rewards).reshape(-1)


class SPRLearner(WeightedSFTLearner):
    """SPR with the group normaliser (algo.normalizer=group)."""

    def sample_weights(self, ctx: BatchContext, rewards: Tensor) -> Tensor:
        algo = self.algo
        return spr_weights(rewards, algo.weight_temperature, algo.max_weight).reshape(-1)


class LearnedNormalizerSPRLearner(SPRLearner):
    """SPR with one sample per prompt (algo.normalizer=learned): V(x) from a value LoRA +
    scalar head, regressed on the rewards, replaces the group normaliser. Weights use V as
    fitted on earlier batches (a baseline independent of the sample it weighs); V is then
    fitted on this batch."""

    with_value = True

    def prompt_values(self, batch: TokenBatch) -> Tensor:
        """V(x): the value at the position that predicts the first response token ([B])."""
        return self.net.values(batch)[:, 0]

    def sample_weights(self, ctx: BatchContext, rewards: Tensor) -> Tensor:
        with torch.no_grad():
            values = self.prompt_values(ctx.batch)
        algo = self.algo
        return awr_weights(rewards.reshape(-1), values, algo.weight_temperature, algo.max_weight)

    def fit_normalizer(self, mb: TokenBatch, rewards: Tensor) -> dict[str, Tensor]:
        loss = torch.nn.functional.mse_loss(self.prompt_values(mb), rewards)
        self.step(loss, self.value_params, self.value_opt)
        return {"value_loss": loss}
