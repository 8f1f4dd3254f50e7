"""One forward/backward and one optimiser step over the rows of several adapters.

Each adapter's share of a joint step is an `AdapterStep`: the rows of its own batch it trains
on, its loss, its parameters, optimiser and clipping. The rows of every step are padded to one
batch and go through one routed forward pass (routing.py: the base projections once, each run
of rows through its own adapter); each adapter's loss is computed on its own rows and
normalised over them alone, the losses are summed and back-propagated once. The adapters'
parameters are disjoint and a transformer's rows never mix, so each adapter's gradient is
exactly its own loss's. Then each adapter clips its own gradient and steps its own optimiser;
one whose loss or gradient norm is not finite skips its step alone (UpdateDiverged, by owner),
the others' steps apply.

An adapter's minibatch may be cut into micro-batches (its own token budget), their gradients
accumulated with their shares; micro-batch m of every adapter goes into joint pass m, or into
several passes where they hold more tokens than a pass may (learner.max_tokens_per_pass).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..common.records import UpdateDiverged
from .core import LearnerCore
from .model import PolicyValueModel, TokenBatch
from .routing import Route

# (micro-batch, its row indices in the adapter's batch, the pass's output for it: log-probs
# and entropy [rows, T] for an LM-head adapter, values [rows, T] for a scalar-head one)
#   -> (loss, metrics)
MicroLoss = Callable[[TokenBatch, Tensor, tuple[Tensor, ...]], tuple[Tensor, dict[str, Tensor]]]
LM, HEAD = "lm", "head"  # what a pass reads: the LM head's log-probs, or a scalar head


@dataclass
class AdapterStep:
    """One adapter's optimiser step within a joint step."""

    owner: str  # the policy (or client) it reports to
    adapter: str  # the adapter its rows go through
    reads: str  # LM or HEAD
    batch: TokenBatch  # the adapter's whole batch
    chunk: Tensor  # the rows of `batch` it trains on
    loss_of: MicroLoss
    core: LearnerCore  # the owner's: finite checks, clipping
    params: list
    optimizer: torch.optim.Optimizer
    averaged_over: str = "tokens"  # what its loss averages over: "tokens" or "rows"
    max_tokens: int | None = None  # per micro-batch (padded rows x length); None: no cut
    totals: dict[str, Tensor] = field(default_factory=dict)

    def micro_batches(self) -> list[tuple[Tensor, float]]:
        """`chunk` as micro-batches of at most max_tokens tokens, each with its share of the
        minibatch: of its rows or of its tokens, as the loss averages over."""
        chunk, batch = self.chunk, self.batch
        if self.max_tokens is None:
            return [(chunk, 1.0)]
        parts = chunk.split(max(1, self.max_tokens // batch.input_ids.shape[1]))
        if self.averaged_over == "rows":
            return [(rows, len(rows) / len(chunk)) for rows in parts]
        tokens = batch.mask[chunk].sum()
        return [(rows, float(batch.mask[rows].sum() / tokens)) for rows in parts]

    def add(self, metrics: dict[str, Tensor], share: float) -> None:
        for key, value in metrics.items():
            value = share * value.detach()
            self.totals[key] = self.totals[key] + value if key in self.totals else value


def concat_batches(batches: list[TokenBatch], pad_id: int) -> TokenBatch:
    """Batches of different widths as one, right-padded to the widest (one batch: itself)."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.input_ids.shape[1] for b in batches)
    t_max = max(b.mask.shape[1] for b in batches)

    def cat(tensors: list[Tensor], size: int, fill: float) -> Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, size - t.shape[1]), value=fill)
                          for t in tensors])

    return TokenBatch(
        cat([b.input_ids for b in batches], width, pad_id),
        cat([b.attention_mask for b in batches], width, 0),
        cat([b.positions for b in batches], t_max, 0),
        cat([b.response_ids for b in batches], t_max, pad_id),
        cat([b.mask for b in batches], t_max, 0.0),
    )


def joint_forward(net: PolicyValueModel, parts: list[tuple[TokenBatch, str | list[str]]],
                  reads: str, pad_id: int, with_entropy: bool = False) -> list[tuple[Tensor, ...]]:
    """One routed pass over every (batch, adapters) part; each part's outputs back, cut to
    its own rows and response width: (log-probs[, entropy]) under LM, (values,) under HEAD."""
    batch = concat_batches([b for b, _ in parts], pad_id)
    route = Route.of([(adapters, len(b.input_ids)) for b, adapters in parts])
    if reads == LM:
        out = net.logprobs(batch, with_entropy, route)
        out = out if with_entropy else (out,)
    else:
        out = (net.values(batch, route),)
    results, start = [], 0
    for b, _ in parts:
        rows, width = len(b.input_ids), b.mask.shape[1]
        results.append(tuple(o[start:start + rows, :width] for o in out))
        start += rows
    return results


def joint_passes(steps: list[AdapterStep], max_tokens: int | None
                 ) -> list[list[tuple[AdapterStep, Tensor, float]]]:
    """Micro-batch m of every step (with its rows and share), packed in order into passes of
    at most `max_tokens` tokens (padded rows x length; a micro-batch is never cut, so one
    larger than that is a pass alone); None: micro-batch m of all steps in one pass."""
    micro = [step.micro_batches() for step in steps]
    passes = []
    for m in range(max(len(parts) for parts in micro)):
        current, tokens = [], 0
        for step, parts in zip(steps, micro, strict=True):
            if m >= len(parts):
                continue
            rows, share = parts[m]
            size = len(rows) * step.batch.input_ids.shape[1]
            if current and max_tokens is not None and tokens + size > max_tokens:
                passes.append(current)
                current, tokens = [], 0
            current.append((step, rows, share))
            tokens += size
        passes.append(current)
    return passes


def joint_step(net: PolicyValueModel, steps: list[AdapterStep], pad_id: int,
               autocast: Callable[[], AbstractContextManager],
               max_tokens_per_pass: int | None = None) -> dict[str, UpdateDiverged]:
    """One optimiser step of every adapter of `steps` (all reading the same head kind) from
    joint passes (`joint_passes`); each step's metrics, weighted by its micro-batches' shares,
    land in its `totals` with its loss as "loss" and its "grad_norm". Returns the owners whose
    step was skipped, each with its UpdateDiverged (nothing of theirs applied)."""
    if not steps:
        return {}
    reads = steps[0].reads
    for step in steps:
        step.optimizer.zero_grad(set_to_none=True)
        step.totals = {}
    for here in joint_passes(steps, max_tokens_per_pass):
        selected = [step.batch.select(rows) for step, rows, _ in here]
        with autocast():
            outputs = joint_forward(net, [(mb, step.adapter) for mb, (step, _, _)
                                          in zip(selected, here, strict=True)],
                                    reads, pad_id, with_entropy=reads == LM)
            total = 0.0
            for (step, rows, share), mb, out in zip(here, selected, outputs, strict=True):
                loss, metrics = step.loss_of(mb, rows, out)
                total = total + loss * share
                step.add({"loss": loss, **metrics}, share)
        total.backward()
    failed = {}
    for step in steps:
        try:
            step.core.check_finite("loss", step.totals["loss"])
            step.totals["grad_norm"] = step.core.clip_and_step(step.params, step.optimizer)
        except UpdateDiverged as exc:
            step.optimizer.zero_grad(set_to_none=True)
            failed[step.owner] = exc
    return failed
