"""The core every learner shares: the base model with its adapters, publishing and sync
checks, stale-rollout refusal, the old/reference log-probs of a batch, optimiser steps. The
offline stages, the reward adapter and checkpoints are mixins of the actor (actor.py)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common.config import LoRAConfig
from ..common.devices import actor_device, model_dtype
from ..common.records import AdapterSnapshot, ProbeResult, ScoredRollout, TrainStats
from .algorithms.ppo import kl_penalty, masked_mean
from .algorithms.registry import AlgoConfig
from .model import DTYPES, POLICY, VALUE, PolicyValueModel, TokenBatch, collate, collate_scored


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


# (micro-batch, its row indices in the batch) -> (loss, metrics)
MicroLoss = Callable[[TokenBatch, Tensor], tuple[Tensor, dict[str, Tensor]]]


class LearnerBase:
    with_value = False
    # what the rl losses average over in a minibatch, "tokens" or "rows": weighs each
    # micro-batch's gradient so that their sum is the minibatch's own
    averaged_over = "tokens"

    def __init__(
        self, model_path: str, lora: LoRAConfig, algo: AlgoConfig, *, dtype: str | None,
        seed: int, threads: int, pad_token_id: int, device: str | None = None,
        attn_implementation: str | None = None, gradient_checkpointing: bool = False,
    ) -> None:
        """device None: the GPU Ray assigned this actor, else the CPU; dtype None: by device."""
        torch.set_num_threads(threads)
        self.algo = algo
        self.pad_id = pad_token_id
        if device is None:
            device, dtype = actor_device(dtype)
        self.model_path, self.lora = model_path, lora
        self.dtype = model_dtype(dtype, device != "cpu")
        adapters = (POLICY, VALUE) if self.with_value else (POLICY,)
        self.net = PolicyValueModel(
            model_path, lora, DTYPES[self.dtype], seed, adapters, device, attn_implementation,
            gradient_checkpointing,
        )
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
    def check_probe(
        self, results: list[ProbeResult], tolerance: float, adapters: list[str] | None = None
    ) -> float:
        """Raise SyncError unless every worker's probe log-probs match ours (under the policy,
        or under `adapters` together); returns max gap."""
        worst = 0.0
        for result in results:
            if result.adapter_version != self.version:
                raise SyncError(
                    f"rollout worker {result.worker_id} reports adapter v{result.adapter_version},"
                    f" learner published v{self.version}"
                )
            batch = collate(result.prompt_ids, result.response_ids, self.pad_id, self.net.device)
            logp = self.net.logprobs(batch, adapters=adapters)
            gap = float(((logp - padded(result.logprobs, batch)).abs() * batch.mask).max())
            if gap > tolerance:
                served = "" if adapters is None else f" ({'+'.join(adapters)})"
                raise SyncError(
                    f"rollout worker {result.worker_id} claims adapter v{result.adapter_version}"
                    f"{served} but its probe log-probs differ from the learner's by {gap:.3g} "
                    f"(tolerance {tolerance:g}): the adapter swap did not take effect"
                )
            worst = max(worst, gap)
        return worst

    def peak_memory_mib(self) -> float:
        """The learner's peak memory so far: CUDA's max allocated on a GPU, else the actor
        process's peak RSS (Linux reports ru_maxrss in KiB)."""
        if self.net.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.net.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def start_stage(self, lr: float) -> None:
        """A fresh policy optimiser: each stage (sft, dpo, rl) starts its own Adam moments."""
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=lr, weight_decay=0)

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

    def with_kl_loss(self, loss: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
        """`loss` plus kl_coef * k3 KL to the reference when algo.kl_mode is "loss" (the
        clipped-objective algorithms; with "reward" the KL shaped the rewards instead)."""
        if self.algo.kl_mode != "loss":
            return loss
        return loss + self.algo.kl_coef * masked_mean(kl_penalty(logp, ref_logp, "k3"), mask)

    def step(self, loss: Tensor, params: list, optimizer: torch.optim.Optimizer) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.clip_and_step(params, optimizer)

    def clip_and_step(self, params: list, optimizer: torch.optim.Optimizer) -> Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.algo.max_grad_norm)
        optimizer.step()
        return grad_norm

    def micro_batches(self, batch: TokenBatch, chunk: Tensor) -> list[tuple[Tensor, float]]:
        """Minibatch rows `chunk` as micro-batches of at most algo.max_tokens_per_microbatch
        tokens (rows x the batch's padded length), each with its share of the minibatch."""
        budget = self.algo.max_tokens_per_microbatch
        if budget is None:
            return [(chunk, 1.0)]
        parts = chunk.split(max(1, budget // batch.input_ids.shape[1]))
        if self.averaged_over == "rows":
            return [(rows, len(rows) / len(chunk)) for rows in parts]
        tokens = batch.mask[chunk].sum()
        return [(rows, float(batch.mask[rows].sum() / tokens)) for rows in parts]

    def accumulated_step(
        self, batch: TokenBatch, chunk: Tensor, loss_of: MicroLoss, params: list,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Tensor]:
        """One optimiser step on minibatch rows `chunk`, its gradient accumulated over
        `micro_batches` weighted by their shares. Returns the metrics weighted alike, with the
        loss as "loss" and the step's "grad_norm"."""
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        for rows, share in self.micro_batches(batch, chunk):
            loss, metrics = loss_of(batch.select(rows), rows)
            (loss * share).backward()
            for key, value in {"loss": loss, **metrics}.items():
                value = share * value.detach()
                totals[key] = totals[key] + value if key in totals else value
        totals["grad_norm"] = self.clip_and_step(params, optimizer)
        return totals

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
