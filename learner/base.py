"""What every learner shares: the base model with its adapters, publishing and sync checks,
stale-rollout refusal, the old/reference log-probs of a batch, optimiser steps, saving."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..common.config import AlgoConfig, LoRAConfig
from ..common.records import (
    AdapterSnapshot,
    OfflineStats,
    PreferencePair,
    ProbeResult,
    ScoredRollout,
    SFTExample,
    TrainStats,
)
from ..common.state_io import load_state, save_state
from .algorithms.critic_free import dpo_loss
from .algorithms.ppo import kl_penalty, masked_mean
from .model import (
    POLICY,
    REWARD,
    VALUE,
    PolicyValueModel,
    TokenBatch,
    collate,
    collate_scored,
    load_adapter,
    save_adapter,
)
from .reward_model import (
    RewardModelTrainer,
    attach_reward_model,
    read_reward_model_meta,
    rollout_rows,
    save_reward_model,
    score_rows,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SyncError(RuntimeError):
    """A rollout worker serves something other than the learner's published adapter."""


@dataclass
class BatchContext:
    """A scored batch as the learner sees it before any update (all tensors detached)."""

    batch: TokenBatch
    scores: Tensor  # [B]
    old_logp: Tensor  # [B, T], recomputed by the learner (exact for importance ratios)
    ref_logp: Tensor  # [B, T], adapters disabled
    logprob_gap: float  # mean |old_logp - vLLM logprob| over response tokens
    kl: float  # per-token k3 KL(sampling policy || reference) on the batch's own samples


class LearnerBase:
    with_value = False

    def __init__(
        self, model_path: str, lora: LoRAConfig, algo: AlgoConfig, *, dtype: str, seed: int,
        threads: int, pad_token_id: int, device: str = "cpu",
    ) -> None:
        torch.set_num_threads(threads)
        self.algo = algo
        self.pad_id = pad_token_id
        self.model_path, self.lora, self.dtype = model_path, lora, dtype
        adapters = (POLICY, VALUE) if self.with_value else (POLICY,)
        self.net = PolicyValueModel(model_path, lora, DTYPES[dtype], seed, adapters, device)
        self.reward_trainer: RewardModelTrainer | None = None
        self.reward_tokenizer = None
        self.policy_params = self.net.adapter_parameters(POLICY)
        self.start_stage(algo.policy_lr)
        if self.with_value:
            self.value_params = self.net.adapter_parameters(VALUE)
            self.value_opt = torch.optim.AdamW(self.value_params, lr=algo.value_lr, weight_decay=0)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0  # the adapter the policy weights are at; bumped by every update

    # -- publishing and sync verification -------------------------------------------------
    def publish(self) -> AdapterSnapshot:
        return self.net.snapshot(POLICY, self.version)

    def get_version(self) -> int:
        return self.version

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
            batch = collate(result.prompt_ids, result.response_ids, self.pad_id, self.net.device)
            gap = float(((self.net.logprobs(batch) - padded(result.logprobs, batch)).abs()
                         * batch.mask).max())
            if gap > tolerance:
                raise SyncError(
                    f"rollout worker {result.worker_id} claims adapter v{result.adapter_version}"
                    f" but its probe log-probs differ from the learner's by {gap:.3g} (tolerance"
                    f" {tolerance:g}): the adapter swap did not take effect"
                )
            worst = max(worst, gap)
        return worst

    def start_stage(self, lr: float) -> None:
        """A fresh policy optimiser: each stage (sft, dpo, rl) starts its own Adam moments."""
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=lr, weight_decay=0)

    # -- offline stages: one optimiser step per call, on one minibatch ----------------------
    def sft_step(self, examples: list[SFTExample]) -> OfflineStats:
        """Token-mean negative log-likelihood of the responses under the policy adapter."""
        batch = collate(
            [e.prompt_ids for e in examples], [e.response_ids for e in examples], self.pad_id,
            self.net.device,
        )
        loss = -masked_mean(self.net.logprobs(batch), batch.mask)
        grad_norm = self.step(loss, self.policy_params, self.policy_opt)
        self.version += 1
        return OfflineStats(self.version, loss.item(), float(grad_norm), len(examples))

    def dpo_step(self, pairs: list[PreferencePair], beta: float) -> OfflineStats:
        """DPO against the adapter-off reference: chosen and rejected rows in one forward."""
        batch = collate(
            [p.prompt_ids for p in pairs] * 2,
            [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], self.pad_id,
            self.net.device,
        )
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

    # -- the reward adapter (PERL: reward model on the learner's own base) ---------------------
    def start_reward_model(self, lr: float) -> None:
        """Add a fresh reward adapter + head (the `rm` stage trains it)."""
        self.net.add_adapter(REWARD, self.lora)
        self.reward_trainer = RewardModelTrainer(
            self.net, lr, self.algo.max_grad_norm, self.pad_id
        )

    def rm_step(self, pairs: list[PreferencePair]) -> OfflineStats:
        return self.reward_trainer.step(pairs)

    def rm_evaluate(self, pairs: list[PreferencePair]) -> dict[str, float]:
        return self.reward_trainer.evaluate(pairs)

    def save_reward_model(self, directory: str, info: dict) -> str:
        return str(save_reward_model(
            self.net, Path(directory), self.model_path, self.lora, self.dtype, info
        ))

    def load_reward_model(self, directory: str) -> dict:
        """Serve a saved reward model from this base (reward.model_on_learner); it must have
        been trained on the same base model."""
        meta = read_reward_model_meta(Path(directory))
        if meta["base_model"] != self.model_path:
            raise ValueError(
                f"reward model {directory} was trained on {meta['base_model']}, the learner "
                f"holds {self.model_path}: reward.model_on_learner needs the same base"
            )
        if REWARD in self.net.heads:  # e.g. restored from a checkpoint
            load_adapter(self.net, REWARD, Path(directory))
        else:
            attach_reward_model(self.net, Path(directory))
        return meta

    def score_rollouts(self, rollouts: list) -> list[float]:
        """The reward adapter's scores of finished rollouts (re-tokenised as in training)."""
        if self.reward_tokenizer is None:
            from transformers import AutoTokenizer

            self.reward_tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return score_rows(self.net, rollout_rows(self.reward_tokenizer, rollouts), self.pad_id)

    # -- shared pieces of an update -----------------------------------------------------------
    @torch.no_grad()
    def prepare(self, scored: list[ScoredRollout]) -> BatchContext:
        stale = [s.rollout for s in scored if s.rollout.adapter_version != self.version]
        if stale:
            r = stale[0]
            raise SyncError(
                f"{len(stale)} rollouts are stale: {r.sample_id} came from adapter "
                f"v{r.adapter_version} on worker {r.worker_id}, learner is at v{self.version}"
            )
        batch = collate_scored(scored, self.pad_id, self.net.device)
        old_logp = self.net.logprobs(batch)
        ref_logp = self.net.reference_logprobs(batch)
        vllm_logp = padded([s.rollout.logprobs for s in scored], batch)
        return BatchContext(
            batch=batch, scores=torch.tensor([s.reward for s in scored], device=batch.mask.device),
            old_logp=old_logp, ref_logp=ref_logp,
            logprob_gap=float(masked_mean((old_logp - vllm_logp).abs(), batch.mask)),
            kl=float(masked_mean(kl_penalty(old_logp, ref_logp, "k3"), batch.mask)),
        )

    def minibatches(self, size: int):
        """`epochs` shuffled passes of row-index chunks."""
        for _ in range(self.algo.epochs):
            yield from torch.randperm(size, generator=self.generator).split(
                self.algo.minibatch_size
            )

    def step(self, loss: Tensor, params: list, optimizer: torch.optim.Optimizer) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.algo.max_grad_norm)
        optimizer.step()
        return grad_norm

    def finish(
        self, ctx: BatchContext, totals: dict[str, float], start: float, **extra: float
    ) -> TrainStats:
        """Close an update: bump the version, average the minibatch metrics."""
        trained_version = self.version
        self.version += 1
        count = totals.pop("_count")
        return TrainStats(
            adapter_version=trained_version, kl=ctx.kl, logprob_diff_vllm=ctx.logprob_gap,
            train_seconds=time.perf_counter() - start,
            **{key: value / count for key, value in totals.items()}, **extra,
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Policy adapter in PEFT format at `directory`; value / reward adapters (+ heads) in
        sub-directories named after them."""
        path = Path(directory)
        for name in self.adapter_names():
            save_adapter(self.net, name, self.version, path if name == POLICY else path / name)
        return str(path)

    def adapter_names(self) -> list[str]:
        return [POLICY, *(n for n in (VALUE, REWARD) if n in self.net.heads)]

    def save_checkpoint(self, directory: str) -> str:
        """Everything to continue training exactly: adapters (PEFT format), value head,
        optimiser states, RNG states, the adapter version (safetensors + JSON, no pickle)."""
        path = Path(self.save(directory))
        state = {
            "version": self.version,
            "policy_opt": self.policy_opt.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.with_value:
            state["value_opt"] = self.value_opt.state_dict()
        if self.reward_trainer is not None:
            state["reward_trainer"] = self.reward_trainer.state()
        save_state(state, path, "learner_state")
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restore a `save_checkpoint` directory; returns the adapter version it holds."""
        path = Path(directory)
        state = load_state(path, "learner_state")
        if "reward_trainer" in state and REWARD not in self.net.heads:
            self.start_reward_model(self.algo.policy_lr)  # lr comes back with the state
        for name in self.adapter_names():
            load_adapter(self.net, name, path if name == POLICY else path / name)
        if self.with_value:
            self.value_opt.load_state_dict(state["value_opt"])
        if "reward_trainer" in state:
            self.reward_trainer.load_state(state["reward_trainer"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.version = state["version"]
        return self.version


def accumulate(totals: dict[str, float], step: dict[str, Tensor]) -> None:
    """Running sums of per-minibatch metrics; `_count` counts minibatches."""
    for key, value in step.items():
        totals[key] = totals.get(key, 0.0) + float(value.detach())
    totals["_count"] = totals.get("_count", 0.0) + 1


def padded(rows: list[list[float]], batch: TokenBatch) -> Tensor:
    """Per-token values of ragged rows laid out like the batch's response tensors."""
    out = torch.zeros_like(batch.mask)
    for b, values in enumerate(rows):
        out[b, : len(values)] = torch.tensor(values)
    return out
