"""The learner: PPO on the policy adapter with a LoRA value model, against the adapter-off
reference. The driver runs it as a Ray actor (`ray.remote(PPOLearner)`); tests use it directly.

Old log-probs: recomputed here with the learner's own forward pass (exact for the ratio), and
compared with the log-probs vLLM reported while sampling; the mean gap is logged as
`logprob_diff_vllm` (a drifting gap means the rollout engine serves something else).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..common.config import LoRAConfig, PPOConfig
from ..common.records import AdapterSnapshot, ProbeResult, ScoredRollout, TrainStats
from .algorithms.ppo import (
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from .model import POLICY, VALUE, PolicyValueModel, collate, collate_scored

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SyncError(RuntimeError):
    """A rollout worker serves something other than the learner's published adapter."""


class PPOLearner:
    def __init__(
        self, model_path: str, lora: LoRAConfig, algo: PPOConfig, *, dtype: str, seed: int,
        threads: int, pad_token_id: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.algo = algo
        self.pad_id = pad_token_id
        self.net = PolicyValueModel(model_path, lora, DTYPES[dtype], seed)
        self.policy_params = self.net.adapter_parameters(POLICY)
        self.value_params = self.net.adapter_parameters(VALUE)
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=algo.policy_lr, weight_decay=0)
        self.value_opt = torch.optim.AdamW(self.value_params, lr=algo.value_lr, weight_decay=0)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0  # the adapter the policy weights are at; bumped by every update

    # -- publishing and sync verification -------------------------------------------------
    def publish(self) -> AdapterSnapshot:
        return self.net.snapshot(POLICY, self.version)

    @torch.no_grad()
    def check_probe(self, results: list[ProbeResult], tolerance: float) -> float:
        """Raise SyncError unless every worker's probe log-probs match ours; returns max gap."""
        worst = 0.0
        for result in results:
            if result.adapter_version != self.version:
                raise SyncError(
                    f"rollout worker {result.worker_id} reports adapter v{result.adapter_version},"
                    f" learner published v{self.version}"
                )
            batch = collate(result.prompt_ids, result.response_ids, self.pad_id)
            ours = self.net.logprobs(batch)
            theirs = torch.zeros_like(ours)
            for b, lps in enumerate(result.logprobs):
                theirs[b, : len(lps)] = torch.tensor(lps)
            gap = float(((ours - theirs).abs() * batch.mask).max())
            if gap > tolerance:
                raise SyncError(
                    f"rollout worker {result.worker_id} claims adapter v{result.adapter_version}"
                    f" but its probe log-probs differ from the learner's by {gap:.3g} (tolerance"
                    f" {tolerance:g}): the adapter swap did not take effect"
                )
            worst = max(worst, gap)
        return worst

    # -- the PPO update -------------------------------------------------------------------
    def train_step(self, scored: list[ScoredRollout]) -> TrainStats:
        start = time.perf_counter()
        algo = self.algo
        stale = [s.rollout for s in scored if s.rollout.adapter_version != self.version]
        if stale:
            r = stale[0]
            raise SyncError(
                f"{len(stale)} rollouts are stale: {r.sample_id} came from adapter "
                f"v{r.adapter_version} on worker {r.worker_id}, learner is at v{self.version}"
            )
        batch = collate_scored(scored, self.pad_id)
        mask = batch.mask
        scores = torch.tensor([s.reward for s in scored])
        with torch.no_grad():
            old_logp = self.net.logprobs(batch)
            ref_logp = self.net.reference_logprobs(batch)
            old_values = self.net.values(batch)
            vllm_logp = torch.zeros_like(old_logp)
            for b, s in enumerate(scored):
                vllm_logp[b, : len(s.rollout.logprobs)] = torch.tensor(s.rollout.logprobs)
            logprob_gap = masked_mean((old_logp - vllm_logp).abs(), mask)
            # On-policy KL of the policy that sampled this batch (k3: unbiased, >= 0).
            kl_sampled = masked_mean(kl_penalty(old_logp, ref_logp, "k3"), mask)
            kl_in_reward = algo.kl_coef if algo.kl_mode == "reward" else 0.0
            kl_old = kl_penalty(old_logp, ref_logp, "k1")
            rewards = token_rewards(scores, kl_old, mask, kl_in_reward)
            advantages, returns = gae_advantages(rewards, old_values, mask, algo.gamma, algo.lam)
            if algo.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        totals: dict[str, float] = {}
        n_updates = 0
        for _ in range(algo.epochs):
            order = torch.randperm(len(scored), generator=self.generator)
            for chunk in order.split(algo.minibatch_size):
                mb = batch.select(chunk)
                logp, entropy = self.net.logprobs(mb, with_entropy=True)
                pg_loss, clip_frac, approx_kl = ppo_policy_loss(
                    logp, old_logp[chunk], advantages[chunk], mb.mask, algo.clip_eps
                )
                loss = pg_loss
                if algo.kl_mode == "loss":
                    kl = masked_mean(kl_penalty(logp, ref_logp[chunk], "k3"), mb.mask)
                    loss = loss + algo.kl_coef * kl
                grad_norm = self._step(loss, self.policy_params, self.policy_opt)
                values = self.net.values(mb)
                v_loss, v_clip = ppo_value_loss(
                    values, old_values[chunk], returns[chunk], mb.mask, algo.value_clip_eps
                )
                self._step(v_loss, self.value_params, self.value_opt)
                step = {
                    "policy_loss": pg_loss, "value_loss": v_loss,
                    "entropy": masked_mean(entropy, mb.mask), "clip_fraction": clip_frac,
                    "value_clip_fraction": v_clip, "approx_kl": approx_kl, "grad_norm": grad_norm,
                }
                for key, value in step.items():
                    totals[key] = totals.get(key, 0.0) + float(value.detach())
                n_updates += 1
        trained_version = self.version
        self.version += 1
        return TrainStats(
            adapter_version=trained_version,
            kl=float(kl_sampled),
            **{key: value / n_updates for key, value in totals.items()},
            logprob_diff_vllm=float(logprob_gap),
            train_seconds=time.perf_counter() - start,
        )

    def _step(
        self, loss: torch.Tensor, params: list, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.algo.max_grad_norm)
        optimizer.step()
        return grad_norm

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Policy adapter in PEFT format at `directory`, value adapter + head under value/."""
        from safetensors.torch import save_file

        path = Path(directory)
        self.publish().save_pretrained(path)
        self.net.snapshot(VALUE, self.version).save_pretrained(path / "value")
        save_file(
            {k: v.detach().contiguous() for k, v in self.net.value_head.state_dict().items()},
            path / "value" / "value_head.safetensors",
        )
        return str(path)
