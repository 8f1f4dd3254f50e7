"""Training on samples an older adapter drew (rollout.mode=async): decoupled PPO (Hilton et al.
2021, "Batch size-invariance for policy optimization"; AReaL, Fu et al. 2025).

Three policies meet in an asynchronous update: the behaviour policy mu that sampled (vLLM, the
adapter a few versions back: its log-probs travel with each Rollout), the proximal policy
pi_prox (the learner's weights when the update starts: its recomputed "old" log-probs) and the
policy pi_theta being optimised. Decoupled PPO keeps PPO's clip around pi_prox, so the step
size is bounded as on-policy, and corrects for mu with the per-token weight pi_prox / mu,
truncated at `cap` (truncated importance sampling of the behaviour term only):

    L = -E_mu[ w_t * min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ],
    w_t = min(pi_prox / mu, cap) (no gradient),  r_t = pi_theta / pi_prox.

As w_t > 0 it factors into the advantage: the learners pass w_t * A_t to the clipped losses.
Shapes as in ppo.py: per-token tensors [batch, T] with a float response `mask`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ppo import masked_mean


def behaviour_weights(prox_logp: Tensor, behaviour_logp: Tensor, mask: Tensor,
                      cap: float) -> Tensor:
    """w_t = min(exp(prox_logp - behaviour_logp), cap) on response tokens, 0 on padding."""
    return torch.exp(prox_logp - behaviour_logp).clamp(max=cap) * mask


def weighted_token_mean(values: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """E_pi[x] from tokens mu sampled: the mean over response tokens of w_t * x_t (the
    behaviour weights; w = mask on-policy gives the plain mean). The k3 KL to the reference
    needs it: on a token the policy finds unlikely, exp(ref - logp) is huge (a seed-1 async run
    logged KL 19.6 on an otherwise normal step), and w_t ~ pi / mu takes it back to ~ref / mu."""
    return masked_mean(values * weights, mask)
