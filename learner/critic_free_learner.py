"""Critic-free learners on the same actors: GRPO and RLOO (group baselines on the clipped
objective) and SPR / best-of-N SFT (re-weighted supervised learning). None of them carries a
value adapter; SPR and best-of-N need no reference either (its KL is only logged)."""

from __future__ import annotations

import time

import torch

from ..common.records import ScoredRollout, TrainStats
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
from .base import BatchContext, LearnerBase, accumulate
from .model import TokenBatch


def group_rewards(scored: list[ScoredRollout]) -> torch.Tensor:
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


class CriticFreeLearner(LearnerBase):
    def train_step(self, scored: list[ScoredRollout]) -> TrainStats:
        start = time.perf_counter()
        algo = self.algo
        ctx = self.prepare(scored)
        rewards = group_rewards(scored).to(ctx.scores.device)
        extra: dict[str, float] = {}
        if algo.name in ("spr", "best_of_n"):
            weights = self.sample_weights(ctx, rewards)
            extra["weight_max"] = float(weights.max())

            def objective(mb, chunk, logp):
                return weighted_nll(logp, mb.mask, weights[chunk], algo.length_normalize), {}
        else:
            if algo.kl_mode == "reward":  # RLOO-style: the sequence KL lowers the score
                seq_kl = (kl_penalty(ctx.old_logp, ctx.ref_logp, "k1") * ctx.batch.mask).sum(-1)
                rewards = rewards - algo.kl_coef * seq_kl.view_as(rewards)
            if algo.name == "grpo":
                advantages = grpo_advantages(rewards, scale_by_std=algo.grpo_scale_by_std)
            else:
                advantages = rloo_advantages(rewards)
            advantages = advantages.reshape(-1)

            def objective(mb, chunk, logp):
                loss, clip_frac, approx_kl = sequence_advantage_loss(
                    logp, ctx.old_logp[chunk], advantages[chunk], mb.mask, algo.clip_eps
                )
                if algo.kl_mode == "loss":
                    kl = masked_mean(kl_penalty(logp, ctx.ref_logp[chunk], "k3"), mb.mask)
                    loss = loss + algo.kl_coef * kl
                return loss, {"clip_fraction": clip_frac, "approx_kl": approx_kl}

        totals: dict[str, float] = {}
        for chunk in self.minibatches(len(scored)):
            mb = ctx.batch.select(chunk)
            logp, entropy = self.net.logprobs(mb, with_entropy=True)
            loss, metrics = objective(mb, chunk, logp)
            grad_norm = self.step(loss, self.policy_params, self.policy_opt)
            accumulate(totals, {
                "policy_loss": loss, "entropy": masked_mean(entropy, mb.mask),
                "grad_norm": grad_norm, **metrics, **self.fit_normalizer(mb, ctx.scores[chunk]),
            })
        return self.finish(ctx, totals, start, **extra)

    def sample_weights(self, ctx: BatchContext, rewards: torch.Tensor) -> torch.Tensor:
        """SPR / best-of-N weights per sample ([batch], prompt-major)."""
        if self.algo.name == "best_of_n":
            return best_of_n_weights(rewards).reshape(-1)
        return spr_weights(rewards, self.algo.beta, self.algo.max_weight).reshape(-1)

    def fit_normalizer(self, mb: TokenBatch, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hook for a learned normaliser's regression step; group normalisation has none."""
        return {}


class LearnedNormalizerSPRLearner(CriticFreeLearner):
    """SPR with one sample per prompt: V(x) from a value LoRA + scalar head, regressed on the
    rewards, replaces the group normaliser. Weights use V as fitted on earlier batches (a
    baseline independent of the sample it weighs); V is then fitted on this batch."""

    with_value = True

    def prompt_values(self, batch: TokenBatch) -> torch.Tensor:
        """V(x): the value at the position that predicts the first response token ([B])."""
        return self.net.values(batch)[:, 0]

    def sample_weights(self, ctx: BatchContext, rewards: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            values = self.prompt_values(ctx.batch)
        return awr_weights(rewards.reshape(-1), values, self.algo.beta, self.algo.max_weight)

    def fit_normalizer(self, mb: TokenBatch, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(self.prompt_values(mb), rewards)
        self.step(loss, self.value_params, self.value_opt)
        return {"value_loss": loss}
