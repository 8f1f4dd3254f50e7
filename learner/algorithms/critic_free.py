"""Critic-free policy optimisation: group baselines (GRPO, RLOO) and re-weighted likelihood
(SPR, best-of-N SFT), as small pure torch functions.

Shapes: `rewards` is [prompts, n] — the n samples drawn for each prompt, in order. Per-token
tensors are [batch, T] with a float `mask` (1.0 on response tokens), batch = prompts * n in the
same prompt-major order, as in ppo.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ppo import ppo_policy_loss


def grpo_advantages(rewards: Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean_j r_j) / (std_j r_j + eps) within each prompt's
    group; `scale_by_std=False` keeps only the mean baseline (Dr. GRPO). Returns [prompts, n]."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)  # unbiased std, as in GRPO


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j.
    Needs n >= 2. Returns [prompts, n]."""
    n = rewards.shape[-1]
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (rollout.samples_per_prompt)")
    return rewards * n / (n - 1) - rewards.sum(dim=-1, keepdim=True) / (n - 1)


def spr_weights(rewards: Tensor, beta: float, max_weight: float | None = None) -> Tensor:
    """SPR: w_i = n * softmax_i(r / beta) per prompt, i.e. exp((r_i - V(x)) / beta) with
    V(x) = beta * log mean_j exp(r_j / beta); optionally clipped at max_weight. beta -> 0 puts
    all weight on the best sample (best-of-N SFT); beta -> inf gives 1 everywhere (plain SFT)."""
    n = rewards.shape[-1]
    weights = n * torch.softmax(rewards / beta, dim=-1)
    return weights if max_weight is None else weights.clamp(max=max_weight)


def best_of_n_weights(rewards: Tensor) -> Tensor:
    """ReST/RAFT: weight n on each prompt's best sample (first on ties), 0 elsewhere."""
    n = rewards.shape[-1]
    best = rewards.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(rewards).scatter(-1, best, float(n))


def weighted_nll(logp: Tensor, mask: Tensor, weights: Tensor, length_normalize: bool) -> Tensor:
    """-mean_i w_i log pi(y_i | x): the sequence log-likelihood (summed over tokens, or averaged
    per token with length_normalize) weighted per sample. weights: [batch]."""
    seq_logp = (logp * mask).sum(-1)
    if length_normalize:
        seq_logp = seq_logp / mask.sum(-1).clamp(min=1)
    return -(weights.detach() * seq_logp).mean()


def dpo_loss(
    chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor, beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) on sequence log-probs [batch]:
    -log sigmoid(m), m = beta * ((pi_c - ref_c) - (pi_r - ref_r)). Returns (loss, m detached);
    the share of m > 0 is DPO's "reward accuracy"."""
    margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, margin.detach()


def awr_weights(
    rewards: Tensor, values: Tensor, beta: float, max_weight: float | None = None
) -> Tensor:
    """SPR with a learned normaliser (AWR, Peng et al. 2019): w = exp((r - V(x)) / beta),
    optionally clipped; for one sample per prompt, where no group normalises the weights."""
    weights = torch.exp((rewards - values.detach()) / beta)
    return weights if max_weight is None else weights.clamp(max=max_weight)


def sequence_advantage_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO/RLOO's clipped objective: the per-sample advantage [batch] applied to every token,
    times `token_weights` ([batch, T], decoupled PPO's behaviour weights; default: the mask)."""
    weights = mask if token_weights is None else token_weights
    return ppo_policy_loss(logp, old_logp, advantages[:, None] * weights, mask, clip_eps)

