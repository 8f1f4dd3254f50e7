"""Rows of one batch through different adapters in one forward pass (the many-adapters step).

Every LoRA-wrapped linear computes its base projection once for all rows, then adds each run of
rows' own low-rank product, `scale_k * x[run] @ A_k^T @ B_k^T` for the adapters k of that run,
so the base matmuls are shared and each adapter's gradient comes only from its own rows. A
`Route` says which adapters each contiguous run of rows goes through; one adapter for the whole
batch is the one-run case, the base model alone a run with no adapter.

PEFT keeps the adapters, their configs and their save/load (PEFT format); its own forward is
switched to the base projection (`_disable_adapters`) and this module adds the adapters' part
through a forward hook on each LoRA layer. PEFT's mixed-adapter forward (`adapter_names=`) is
inference-only and gathers rows by Python lists in every layer; the runs here are one split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Route:
    """Contiguous runs of a batch's rows, each `(adapters, rows)`: its rows go through the
    adapters named (their updates summed; () for the base model alone), in row order."""

    runs: tuple[tuple[tuple[str, ...], int], ...]

    @classmethod
    def whole(cls, adapters: str | Sequence[str], rows: int) -> Route:
        """Every one of `rows` rows through `adapters` (a name, or names summed)."""
        names = (adapters,) if isinstance(adapters, str) else tuple(adapters)
        return cls(((names, rows),))

    @classmethod
    def of(cls, runs: Sequence[tuple[str | Sequence[str], int]]) -> Route:
        """Runs given as (a name or names, rows); runs of no rows are left out."""
        return cls(tuple(((name,) if isinstance(name, str) else tuple(name), rows)
                         for name, rows in runs if rows))

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.runs)

    def spans(self) -> Iterator[tuple[tuple[str, ...], int, int]]:
        """(adapters, first row, end row) of each run."""
        start = 0
        for adapters, rows in self.runs:
            yield adapters, start, start + rows
            start += rows


class Router:
    """The route of the forward pass under way, read by every LoRA layer's hook."""

    def __init__(self) -> None:
        self.route: Route | None = None
        self.hooked: set[int] = set()  # ids of the LoRA layers carrying the hook

    @contextmanager
    def routed(self, route: Route) -> Iterator[None]:
        if self.route is not None:
            raise RuntimeError("a routed forward pass is already under way")
        self.route = route
        try:
            yield
        finally:
            self.route = None

    @contextmanager
    def replayed(self, route: Route | None) -> Iterator[None]:
        previous, self.route = self.route, route
        try:
            yield
        finally:
            self.route = previous

    def checkpoint_contexts(self):
        """torch.utils.checkpoint's `context_fn`: a checkpointed layer recomputed during the
        backward pass goes through the route its forward pass had."""
        return nullcontext(), self.replayed(self.route)

    def install(self, model: torch.nn.Module) -> None:
        """Hook every LoRA linear of `model` not hooked yet (an adapter on new modules adds
        some), switch PEFT's own adapter path off, and make every LoRA weight trainable: which
        of them get a gradient is decided by the rows that reach them, not by PEFT's active
        adapter."""
        from peft.tuners.lora import Linear

        for module in model.modules():
            if not isinstance(module, Linear):
                continue
            module._disable_adapters = True  # PEFT's forward: the base projection alone
            for layer in (module.lora_A, module.lora_B):
                layer.requires_grad_(True)
            if id(module) not in self.hooked:
                module.register_forward_hook(self.add_low_rank)
                self.hooked.add(id(module))

    def add_low_rank(self, module, args: tuple, base: Tensor) -> Tensor:
        """The hook: the base projection `base` plus each run's adapters' low-rank products."""
        route, x = self.route, args[0]
        if route is None:
            raise RuntimeError("a LoRA layer ran outside a routed forward pass: go through "
                               "PolicyValueModel's passes (logprobs, values, scores)")
        if route.rows != len(x):
            raise ValueError(f"the route covers {route.rows} rows, the batch has {len(x)}")
        # one split of the rows (its backward is one concatenation; a slice per run would
        # each back-propagate a zero-filled gradient of the whole batch)
        runs = x.split([rows for _, rows in route.runs]) if len(route.runs) > 1 else (x,)
        parts, touched = [], False
        for (adapters, _), rows in zip(route.runs, runs, strict=True):
            delta = None
            for name in adapters:
                if name not in module.lora_A:  # this adapter does not target the module
                    continue
                a, b = module.lora_A[name], module.lora_B[name]
                # the scale on the rank-wide product: the cheaper side of the matmul
                low = a(module.lora_dropout[name](rows.to(a.weight.dtype))) * module.scaling[name]
                delta = b(low) if delta is None else delta + b(low)
            touched |= delta is not None
            parts.append(base.new_zeros(len(rows), *base.shape[1:]) if delta is None
                         else delta.to(base.dtype))
        if not touched:
            return base
        return base + (parts[0] if len(parts) == 1 else torch.cat(parts))
