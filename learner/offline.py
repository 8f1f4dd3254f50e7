"""The offline stages on the learner actor (sft, dpo): one optimiser step per call, on one
minibatch, on the policy adapter."""

from __future__ import annotations

from torch import Tensor

from ..common.records import OfflineStats, PreferencePair, SFTExample
from .algorithms.critic_free import dpo_loss
from .algorithms.ppo import masked_mean
from .model import TokenBatch, collate


class OfflineStagesMixin:
    """Uses the learner core's net, pad_id, policy_params, policy_opt, autocast, step and
    version."""

    def sft_step(self, examples: list[SFTExample]) -> OfflineStats:
        """Token-mean negative log-likelihood of the responses under the policy adapter."""
        batch = collate(
            [e.prompt_ids for e in examples], [e.response_ids for e in examples], self.pad_id,
            self.net.device,
        )
        with self.autocast():
            logp = self.net.logprobs(batch)
        return self.nll_step(batch, logp, self.policy_params, self.policy_opt)

    def nll_step(self, batch: TokenBatch, logp: Tensor, params: list, optimizer) -> OfflineStats:
        """One step on the responses' token-mean negative log-likelihood (`logp`: [B, T])."""
        loss = -masked_mean(logp, batch.mask)
        grad_norm = self.step(loss, params, optimizer)
        self.version += 1
        return OfflineStats(self.version, loss.item(), float(grad_norm), len(batch.mask))

    def dpo_step(self, pairs: list[PreferencePair], beta: float) -> OfflineStats:
        """DPO against the adapter-off reference: chosen and rejected rows in one forward."""
        batch = collate(
            [p.prompt_ids for p in pairs] * 2,
            [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], self.pad_id,
            self.net.device,
        )
        with self.autocast():
            seq_logp = (self.net.logprobs(batch) * batch.mask).sum(-1)
            ref_seq_logp = (self.net.reference_logprobs(batch) * batch.mask).sum(-1)
        n = len(pairs)
        loss, margin = dpo_loss(
            seq_logp[:n], seq_logp[n:], ref_seq_logp[:n], ref_seq_logp[n:], beta
        )
        grad_norm = self.step(loss, self.policy_params, self.policy_opt)
        self.version += 1
        return OfflineStats(
            self.version, loss.item(), float(grad_norm), n,
            preference_accuracy=float((margin > 0).float().mean()),
            reward_margin=float(margin.mean()),
        )
