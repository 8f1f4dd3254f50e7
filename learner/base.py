"""The core every learner shares: the base model with its adapters, publishing and sync
checks, stale-rollout refusal, the old/reference log-probs of a batch, optimiser steps. The
offline stages, the reward adapter and checkpoints are mixins of the actor (actor.py)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from ..common.config import DEFAULT_MAX_BEHAVIOUR_WEIGHT, LoRAConfig
from ..common.devices import actor_device, autocast_dtype, model_dtype
from ..common.records import AdapterSnapshot, ProbeResult, ScoredRollout, TrainStats
from .algorithms.off_policy import behaviour_weights, weighted_token_mean
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
    # [B, T], the learner's own (exact for importance ratios): from a forward pass before the
    # update, or, when the update is one step on the whole batch, from that step's own pass
    old_logp: Tensor
    old_logp_from_update: bool
    # [B, T] decoupled PPO's truncated pi_old / pi_vllm per token (off_policy.py); the mask
    # itself when every sample is on-policy (rollout.mode=sync)
    behaviour_weights: Tensor
    ref_logp: Tensor | None  # [B, T], adapters disabled; None when the algorithm needs none
    vllm_logp: Tensor  # [B, T], what the rollout engine reported while sampling

    def old_logp_of(self, rows: Tensor, logp: Tensor) -> Tensor:
        """The old log-probs of batch `rows`, whose current log-probs are `logp`. In a one-step
        update they are `logp` itself, detached (the ratio is 1 by construction, as in TRL's
        GRPO), recorded here for the metrics."""
        if self.old_logp_from_update:
            self.old_logp[rows] = logp.detach()
        return self.old_logp[rows]

    @property
    def logprob_gap(self) -> float:
        """Mean |old_logp - vLLM logprob| over response tokens."""
        return float(masked_mean((self.old_logp - self.vllm_logp).abs(), self.batch.mask))

    @property
    def kl(self) -> float | None:
        """Per-token k3 KL(learner || reference), on the batch's samples weighted by their
        behaviour weights (all 1 on-policy)."""
        if self.ref_logp is None:
            return None
        kl = kl_penalty(self.old_logp, self.ref_logp, "k3")
        return float(weighted_token_mean(kl, self.behaviour_weights, self.batch.mask))


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
        autocast: str = "off", max_staleness: int = 0,
        behaviour_weight_cap: float = DEFAULT_MAX_BEHAVIOUR_WEIGHT,
    ) -> None:
        """device None: the GPU Ray assigned this actor, else the CPU; dtype None: by device;
        autocast: learner.autocast; max_staleness: how many versions behind the learner a
        rollout's adapter may be (rollout.staleness_bound; 0: on-policy only, no behaviour
        weights)."""
        torch.set_num_threads(threads)
        self.algo = algo
        self.pad_id = pad_token_id
        self.max_staleness, self.behaviour_weight_cap = max_staleness, behaviour_weight_cap
        if device is None:
            device, dtype = actor_device(dtype)
        self.model_path, self.lora = model_path, lora
        self.dtype = model_dtype(dtype, device != "cpu")
        self.autocast_dtype = autocast_dtype(autocast, device, self.dtype)
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
        self, results: list[ProbeResult], tolerance: float, adapters: list[str] | None = None,
        prefix: Tensor | None = None,
    ) -> float:
        """Raise SyncError unless every worker's probe log-probs match ours (under the policy,
        or under `adapters` together, after the `prefix` embeddings); returns max gap."""
        worst = 0.0
        for result in results:
            if result.adapter_version != self.version:
                raise SyncError(
                    f"rollout worker {result.worker_id} reports adapter v{result.adapter_version},"
                    f" learner published v{self.version}"
                )
            batch = collate(result.prompt_ids, result.response_ids, self.pad_id, self.net.device)
            logp = self.net.logprobs(batch, adapters=adapters, prefix=prefix)
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
    def autocast(self) -> AbstractContextManager:
        """Where the update's forward passes run: in bfloat16 autocast per learner.autocast."""
        dtype = self.autocast_dtype
        return torch.autocast(self.net.device.type, dtype=DTYPES[dtype or "bfloat16"],
                              enabled=dtype is not None)

    @torch.no_grad()
    def prepare(self, scored: list[ScoredRollout]) -> BatchContext:
        stale = [s.rollout for s in scored
                 if not 0 <= self.version - s.rollout.adapter_version <= self.max_staleness]
        if stale:
            r = stale[0]
            raise SyncError(
                f"{len(stale)} rollouts are stale (more than {self.max_staleness} versions "
                f"behind): {r.sample_id} came from adapter v{r.adapter_version} on worker "
                f"{r.worker_id}, learner is at v{self.version}"
            )
        batch = collate_scored(scored, self.pad_id, self.net.device)
        algo = self.algo
        # one on-policy step on the whole batch: the update's own pass gives the old log-probs
        # (decoupled PPO's proximal policy needs them first, so never under async)
        one_step = (algo.epochs == 1 and algo.minibatch_size >= len(scored)
                    and not algo.needs_old_logp_first and self.max_staleness == 0)
        with self.autocast():
            old_logp = torch.zeros_like(batch.mask) if one_step else self.net.logprobs(batch)
            ref_logp = self.net.reference_logprobs(batch) if algo.uses_reference else None
        vllm_logp = padded([s.rollout.logprobs for s in scored], batch)
        weights = batch.mask if self.max_staleness == 0 else behaviour_weights(
            old_logp, vllm_logp, batch.mask, self.behaviour_weight_cap)
        return BatchContext(
            batch=batch, scores=torch.tensor([s.reward for s in scored], device=batch.mask.device),
            old_logp=old_logp, old_logp_from_update=one_step, behaviour_weights=weights,
            ref_logp=ref_logp, vllm_logp=vllm_logp,
        )

    def minibatches(self, size: int):
        """`epochs` shuffled passes of row-index chunks."""
        for _ in range(self.algo.epochs):
            yield from torch.randperm(size, generator=self.generator).split(
                self.algo.minibatch_size
            )

    def with_kl_loss(self, loss: Tensor, logp: Tensor, ctx: BatchContext, rows: Tensor,
                     mask: Tensor) -> Tensor:
        """`loss` plus kl_coef * k3 KL to the reference of batch `rows` when algo.kl_mode is
        "loss" (the clipped-objective algorithms; with "reward" the KL shaped the rewards)."""
        if self.algo.kl_mode != "loss" or not self.algo.uses_reference:
            return loss
        kl = kl_penalty(logp, ctx.ref_logp[rows], "k3")
        return loss + self.algo.kl_coef * weighted_token_mean(
            kl, ctx.behaviour_weights[rows], mask)

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
            with self.autocast():
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
