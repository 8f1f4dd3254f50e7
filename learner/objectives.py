"""Each RL algorithm's own piece: a function of one prepared batch (`(rl, ctx) -> Objective`,
registered by name in algorithms/registry.py) that computes the batch's advantages or sample
weights with the pure functions of algorithms/ and returns the loss the RL updater (rl.py)
minimises on every minibatch, plus the value model's step where the algorithm fits one.

- ppo: GAE on a LoRA critic, the clipped objective per token.
- grpo, rloo: a group baseline per sample, the clipped objective on every token of it.
- spr, best_of_n: the samples' likelihood weighted per sample (no reference, no ratio); SPR's
  learned normaliser (algo.normalizer=learned) regresses V(x) on the rewards instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .algorithms.critic_free import (
    awr_weights,
    best_of_n_weights,
    grpo_advantages,
    rloo_advantages,
    sequence_advantage_loss,
    spr_weights,
    weighted_nll,
)
from .algorithms.off_policy import weighted_token_mean
from .algorithms.ppo import (
    gae_advantages,
    kl_penalty,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from .joint import MicroLoss
from .rl import BatchContext, RLUpdater


@dataclass
class Objective:
    # (micro-batch, its rows in the batch, its log-probs, their old log-probs) -> (loss,
    # metrics); a "policy_loss" metric replaces the loss itself in the update's metrics
    loss: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    metrics: dict[str, float] = field(default_factory=dict)  # once per update
    # what the loss averages over in a minibatch, "tokens" or "rows": weighs each
    # micro-batch's gradient so that their sum is the minibatch's own
    averaged_over: str = "tokens"
    # after each minibatch's policy step, the value adapter's step on its rows with this loss
    # (joint.MicroLoss: of the micro-batch, its rows and its values), averaged over
    # `value_averaged_over`
    value_loss: MicroLoss | None = None
    value_averaged_over: str = "tokens"


def ppo(rl: RLUpdater, ctx: BatchContext) -> Objective:
    """PPO on the policy adapter with a LoRA critic, against the adapter-off reference."""
    algo, mask, old_values = rl.algo, ctx.batch.mask, ctx.old_values
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

    def loss(mb, rows, logp, old_logp):
        pg_loss, clip_frac, approx_kl = ppo_policy_loss(
            logp, old_logp, advantages[rows], mb.mask, algo.clip_eps)
        return with_kl_loss(pg_loss, logp, rl, ctx, rows, mb.mask), {
            "policy_loss": pg_loss, "clip_fraction": clip_frac, "approx_kl": approx_kl}

    def value_loss(mb, rows, out):
        v_loss, v_clip = ppo_value_loss(
            out[0], old_values[rows], returns[rows], mb.mask, algo.value_clip_eps)
        return v_loss, {"value_clip_fraction": v_clip}

    return Objective(loss, value_loss=value_loss)


def grpo(rl: RLUpdater, ctx: BatchContext) -> Objective:
    scale_by_std = rl.algo.scale_by_std
    return clipped_sequence(rl, ctx, grpo_advantages(kl_shaped(rl, ctx), scale_by_std=scale_by_std))


def rloo(rl: RLUpdater, ctx: BatchContext) -> Objective:
    return clipped_sequence(rl, ctx, rloo_advantages(kl_shaped(rl, ctx)))


def spr(rl: RLUpdater, ctx: BatchContext) -> Objective:
    """SPR with the group normaliser (algo.normalizer=group)."""
    algo = rl.algo
    rewards = ctx.rewards_by_prompt()
    return weighted_likelihood(
        rl, spr_weights(rewards, algo.weight_temperature, algo.max_weight).reshape(-1))


def best_of_n(rl: RLUpdater, ctx: BatchContext) -> Objective:
    return weighted_likelihood(rl, best_of_n_weights(ctx.rewards_by_prompt()).reshape(-1))


def spr_learned_normalizer(rl: RLUpdater, ctx: BatchContext) -> Objective:
    """SPR with one sample per prompt (algo.normalizer=learned): V(x) from the value model,
    regressed on the rewards, replaces the group normaliser. Weights use V as fitted on
    earlier batches (a baseline independent of the sample it weighs); V is then fitted on this
    batch, after each minibatch's policy step."""
    algo = rl.algo
    rewards = ctx.rewards_by_prompt()
    weights = awr_weights(rewards.reshape(-1), ctx.old_values[:, 0], algo.weight_temperature,
                          algo.max_weight)

    def value_loss(mb, rows, out):  # V(x): the value before the first response token
        return torch.nn.functional.mse_loss(out[0][:, 0], ctx.scores[rows]), {}

    return weighted_likelihood(rl, weights, value_loss)


# -- the two losses the critic-free algorithms share -------------------------------------------
def kl_shaped(rl: RLUpdater, ctx: BatchContext) -> Tensor:
    """[prompts, n] scores, less kl_coef x the sequence KL when it shapes the rewards
    (algo.kl_mode=reward, RLOO-style)."""
    algo, rewards = rl.algo, ctx.rewards_by_prompt()
    if algo.needs_old_logp_first:
        seq_kl = (kl_penalty(ctx.old_logp, ctx.ref_logp, "k1") * ctx.batch.mask).sum(-1)
        rewards = rewards - algo.kl_coef * seq_kl.view_as(rewards)
    return rewards


def clipped_sequence(rl: RLUpdater, ctx: BatchContext, advantages: Tensor) -> Objective:
    """The clipped objective with a per-sample advantage ([prompts, n]) on every token."""
    algo, advantages = rl.algo, advantages.reshape(-1)

    def loss(mb, rows, logp, old_logp):
        loss, clip_frac, approx_kl = sequence_advantage_loss(
            logp, old_logp, advantages[rows], mb.mask, algo.clip_eps,
            ctx.behaviour_weights[rows],
        )
        loss = with_kl_loss(loss, logp, rl, ctx, rows, mb.mask)
        return loss, {"clip_fraction": clip_frac, "approx_kl": approx_kl}

    return Objective(loss)


def weighted_likelihood(
    rl: RLUpdater, weights: Tensor, value_loss: MicroLoss | None = None
) -> Objective:
    """The samples' log-likelihood weighted per sample (weights: [batch], prompt-major)."""
    length_normalize = rl.algo.length_normalize

    def loss(mb, rows, logp, old_logp):
        return weighted_nll(logp, mb.mask, weights[rows], length_normalize), {}

    return Objective(loss, {"weight_max": float(weights.max())}, "rows", value_loss, "rows")


def with_kl_loss(loss: Tensor, logp: Tensor, rl: RLUpdater, ctx: BatchContext, rows: Tensor,
                 mask: Tensor) -> Tensor:
    """`loss` plus kl_coef * k3 KL to the reference of batch `rows` when algo.kl_mode is
    "loss" (the clipped-objective algorithms; with "reward" the KL shaped the rewards)."""
    algo = rl.algo
    if algo.kl_mode != "loss" or not algo.uses_reference:
        return loss
    kl = kl_penalty(logp, ctx.ref_logp[rows], "k3")
    return loss + algo.kl_coef * weighted_token_mean(kl, ctx.behaviour_weights[rows], mask)
