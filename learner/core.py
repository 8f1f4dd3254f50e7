"""What the learner's updaters of one policy share: the adapter stack, the policy's adapter
names, its parameters, optimiser and version, where an update's forward passes run (autocast),
collation, the clipped optimiser step that refuses a diverged update, and the probe check of
what rollout workers serve against the learner's own weights."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor

from ..common.records import OfflineStats, ProbeResult, UpdateDiverged
from .algorithms.ppo import masked_mean
from .model import DTYPES, POLICY, PolicyValueModel, TokenBatch, collate, value_adapter


class SyncError(RuntimeError):
    """A rollout worker serves something other than the learner's published adapter, or a
    batch holds rollouts the policy must not train on (stale, or another policy's)."""


class LearnerCore:
    def __init__(
        self, net: PolicyValueModel, pad_id: int, max_grad_norm: float,
        autocast_dtype: str | None, policy_lr: float, name: str = POLICY,
        adapter: str = POLICY,
    ) -> None:
        """autocast_dtype: the update's forward passes in that dtype (learner.autocast), None:
        in the weights' own; name: the policy's (the user's, in messages and on its
        rollouts); adapter: its adapter's on `net`, the learner's own name for it (its value
        adapter's is `value_adapter(adapter)`)."""
        self.net, self.pad_id, self.name, self.adapter = net, pad_id, name, adapter
        self.max_grad_norm, self.autocast_dtype = max_grad_norm, autocast_dtype
        self.policy_params = net.adapter_parameters(adapter)
        self.start_stage(policy_lr)
        # the number of updates applied to the weights the policy publishes
        self.version = 0

    def advance(self) -> int:
        """An update was applied to the weights the policy publishes (load_checkpoint aside,
        the one place its version moves)."""
        self.version += 1
        return self.version

    @property
    def value_name(self) -> str:
        return value_adapter(self.adapter)

    def logprobs(self, batch: TokenBatch, with_entropy: bool = False):
        """Log-probs of the response tokens under the policy's adapter ([B, T])."""
        return self.net.logprobs(batch, with_entropy, adapters=self.adapter)

    def start_stage(self, lr: float) -> None:
        """A fresh policy optimiser: each stage (sft, dpo, rl) starts its own Adam moments."""
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=lr, weight_decay=0)

    def autocast(self) -> AbstractContextManager:
        """Where the update's forward passes run: in bfloat16 autocast per learner.autocast."""
        dtype = self.autocast_dtype
        return torch.autocast(self.net.device.type, dtype=DTYPES[dtype or "bfloat16"],
                              enabled=dtype is not None)

    def collate(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> TokenBatch:
        return collate(prompt_ids, response_ids, self.pad_id, self.net.device)

    def step(self, loss: Tensor, params: list, optimizer: torch.optim.Optimizer) -> Tensor:
        self.check_finite("loss", loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.clip_and_step(params, optimizer)

    def clip_and_step(self, params: list, optimizer: torch.optim.Optimizer) -> Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.check_finite("grad norm", grad_norm)
        optimizer.step()
        return grad_norm

    def check_finite(self, what: str, value: Tensor) -> None:
        """Raise UpdateDiverged unless a step's `what` (loss, grad norm) is finite: before the
        optimiser steps, so the policy's weights and optimiser state stay as they were."""
        if not bool(torch.isfinite(value)):
            raise UpdateDiverged(
                f"policy {self.name!r}: the update at version {self.version} diverged "
                f"({what} {float(value):g}); not applied"
            )

    def nll_step(
        self, batch: TokenBatch, logp: Tensor, params: list, optimizer: torch.optim.Optimizer,
        version: int,
    ) -> OfflineStats:
        """One step on the responses' token-mean negative log-likelihood (`logp`: [B, T]) of
        the weights at `version`."""
        loss = -masked_mean(logp, batch.mask)
        grad_norm = self.step(loss, params, optimizer)
        return OfflineStats(version, loss.item(), float(grad_norm), len(batch.mask))

    @torch.no_grad()
    def check_probe(
        self, results: list[ProbeResult], tolerance: float,
        logprobs: Callable[[TokenBatch], Tensor] | None = None, served: str | None = None,
    ) -> float:
        """Raise SyncError unless every worker's probe reports the policy's version and its
        log-probs match the learner's own `logprobs` of what it serves (None: the policy's;
        `served` names it in the error, None: the policy, unnamed when it is the run's one);
        returns the max gap."""
        version, logprobs = self.version, logprobs or self.logprobs
        if served is None:
            served = "" if self.name == POLICY else f" of policy {self.name!r}"
        worst = 0.0
        for result in results:
            if result.adapter_version != version:
                raise SyncError(
                    f"rollout worker {result.worker_id} reports adapter v{result.adapter_version}"
                    f"{served}, learner published v{version}"
                )
            batch = self.collate(result.prompt_ids, result.response_ids)
            # eager under learner.compile: a few probe prompts are not worth a graph of their own
            with torch.compiler.set_stance("force_eager"):
                ours = logprobs(batch)
            gap = float(((ours - padded(result.logprobs, batch)).abs() * batch.mask).max())
            if gap > tolerance:
                raise SyncError(
                    f"rollout worker {result.worker_id} claims adapter v{result.adapter_version}"
                    f"{served} but its probe log-probs differ from the learner's by {gap:.3g} "
                    f"(tolerance {tolerance:g}): the adapter swap did not take effect"
                )
            worst = max(worst, gap)
        return worst


def padded(rows: list[list[float]], batch: TokenBatch) -> Tensor:
    """Per-token values of ragged rows laid out like the batch's response tensors."""
    out = torch.zeros_like(batch.mask)
    for b, values in enumerate(rows):
        out[b, : len(values)] = torch.tensor(values)
    return out
