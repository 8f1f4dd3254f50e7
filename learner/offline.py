"""The offline stages' updater (sft, dpo): one optimiser step per call, on one minibatch, on
the policy adapter."""

from __future__ import annotations

from ..common.records import OfflineStats, PreferencePair, SFTExample
from .algorithms.critic_free import dpo_loss
from .core import LearnerCore


class OfflineUpdater:
    def __init__(self, core: LearnerCore) -> None:
        self.core = core

    def sft_step(self, examples: list[SFTExample], version: int) -> OfflineStats:
        """Token-mean negative log-likelihood of the responses under the policy adapter."""
        core = self.core
        batch = core.collate([e.prompt_ids for e in examples], [e.response_ids for e in examples])
        with core.autocast():
            logp = core.logprobs(batch)
        return core.nll_step(batch, logp, core.policy_params, core.policy_opt, version)

    def dpo_step(self, pairs: list[PreferencePair], beta: float, version: int) -> OfflineStats:
        """DPO against the adapter-off reference: chosen and rejected rows in one forward."""
        core = self.core
        batch = core.collate([p.prompt_ids for p in pairs] * 2,
                             [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
        with core.autocast():
            seq_logp = (core.logprobs(batch) * batch.mask).sum(-1)
            ref_seq_logp = (core.net.reference_logprobs(batch) * batch.mask).sum(-1)
        n = len(pairs)
        loss, margin = dpo_loss(
            seq_logp[:n], seq_logp[n:], ref_seq_logp[:n], ref_seq_logp[n:], beta
        )
        grad_norm = core.step(loss, core.policy_params, core.policy_opt)
        return OfflineStats(
            version, loss.item(), float(grad_norm), n,
            preference_accuracy=float((margin > 0).float().mean()),
            reward_margin=float(margin.mean()),
        )
