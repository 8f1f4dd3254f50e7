"""PPO math for RLHF-style fine-tuning, as small pure torch functions.

Shapes: every per-token tensor (logp, values, rewards, advantages, ...) is a float
tensor of shape [batch, T] over the *response* tokens, paired with a float `mask` of the
same shape that is 1.0 on real tokens and 0.0 on padding. Padding is only at the right
end of each row, and every row has at least one real token. Per-sequence tensors
(`scores`) are [batch].

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ouyang et al. 2022
(InstructGPT, KL-in-reward), Schulman 2020 "Approximating KL Divergence" (k1/k2/k3).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where mask == 1 (scalar if dim is None)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` by its masked mean / (biased) std; padding is returned as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # unbiased=False: divide by N, not N - 1
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean  # keep the mean (e.g. so the sign of rewards survives)
    return whitened * mask


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi."""
    if kind == "k1":  # unbiased, high variance, can be negative
        return logp - ref_logp
    if kind == "k2":  # biased but low variance, always >= 0
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":  # unbiased, low variance, always >= 0: r - log r - 1 with r = ref/pi
        log_r = ref_logp - logp
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """InstructGPT reward shaping: r_t = -kl_coef * kl_t, plus the sequence score at the
    last real token (the reward model only judges the finished response)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(dim=-1).long() - 1  # right padding => index of the last real token
    return rewards.scatter_add(-1, last[:, None], scores[:, None].to(rewards.dtype))


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), not whitened.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A after the last real token taken as 0 (the episode ends there).
    """
    seq_len = rewards.shape[-1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(seq_len)):
        # mask[:, t + 1] == 0 past the last real token => bootstrap from 0, not padding.
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < seq_len else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by mask[:, t] zeroes padding and resets the recursion at the end.
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate objective (PPO-clip), token-level mean over the batch.

    Returns (loss, clip_fraction, approx_kl); the two metrics are detached.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # max of the negated objectives = pessimistic (lower) bound of the surrogate.
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((pg_losses_clipped > pg_losses).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)  # k2 estimate of KL(old || new)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: the critic may not move more than clip_eps from old_values
    in a direction that lowers the loss. Returns (loss, clip_fraction); the latter detached.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return loss, clip_fraction
