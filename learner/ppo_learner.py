"""PPO on the policy adapter with a LoRA value model, against the adapter-off reference.

Old log-probs: recomputed by the learner's own forward pass (exact for the ratio) and compared
with the log-probs vLLM reported while sampling; the mean gap is logged as `logprob_diff_vllm`
(a drifting gap means the rollout engine serves something else).
"""

from __future__ import annotations

import time

import torch

from ..common.records import ScoredRollout, TrainStats
from .actor import Learner
from .algorithms.ppo import (
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from .base import accumulate


class PPOLearner(Learner):
    with_value = True

    def train_step(self, scored: list[ScoredRollout]) -> TrainStats:
        start = time.perf_counter()
        algo = self.algo
        ctx = self.prepare(scored)
        mask = ctx.batch.mask
        with torch.no_grad(), self.autocast():
            old_values = self.net.values(ctx.batch)
        with torch.no_grad():
            if algo.needs_old_logp_first:
                kl_old, kl_in_reward = kl_penalty(ctx.old_logp, ctx.ref_logp, "k1"), algo.kl_coef
            else:  # no KL in the rewards
                kl_old, kl_in_reward = torch.zeros_like(mask), 0.0
            rewards = token_rewards(ctx.scores, kl_old, mask, kl_in_reward)
            advantages, returns = gae_advantages(rewards, old_values, mask, algo.gamma, algo.lam)
            if algo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            advantages = advantages * ctx.behaviour_weights  # decoupled PPO (off_policy.py)

        def policy_loss(mb, rows):
            logp, entropy = self.net.logprobs(mb, with_entropy=True)
            pg_loss, clip_frac, approx_kl = ppo_policy_loss(
                logp, ctx.old_logp_of(rows, logp), advantages[rows], mb.mask, algo.clip_eps
            )
            loss = self.with_kl_loss(pg_loss, logp, ctx, rows, mb.mask)
            return loss, {"policy_loss": pg_loss, "entropy": masked_mean(entropy, mb.mask),
                          "clip_fraction": clip_frac, "approx_kl": approx_kl}

        def value_loss(mb, rows):
            v_loss, v_clip = ppo_value_loss(
                self.net.values(mb), old_values[rows], returns[rows], mb.mask, algo.value_clip_eps
            )
            return v_loss, {"value_clip_fraction": v_clip}

        totals: dict[str, float] = {}
        for chunk in self.minibatches(len(scored)):
            policy = self.accumulated_step(
                ctx.batch, chunk, policy_loss, self.policy_params, self.policy_opt)
            value = self.accumulated_step(
                ctx.batch, chunk, value_loss, self.value_params, self.value_opt)
            del policy["loss"]
            accumulate(totals, {**policy, "value_loss": value["loss"],
                                "value_clip_fraction": value["value_clip_fraction"]})
        return self.finish(ctx, totals, start)

