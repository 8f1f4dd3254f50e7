"""Tinker's clock cycle on the learner: the training requests of several clients that are
ready together, or arrive within `serve.cycle_s` of the first, run as one learner call (one
forward/backward over every client's datums, each through its own adapter, then their
optimiser steps: `Learner.train_cycle`), each client getting its own result or error back.

The learner loop takes one ready request of each client's lane per cycle (a client's requests
stay in seq_id order) and runs them at once; a `Batcher` per learner method gathers their
calls."""

from __future__ import annotations

import asyncio
from typing import Any


class Batcher:
    """Calls of one learner method (taking a list of calls, returning a list of results or
    errors) gathered for `window_s` after the first, then made as one remote call."""

    def __init__(self, method, window_s: float) -> None:
        self.method, self.window_s = method, window_s
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.calls = 0  # remote calls made
        self.batched = 0  # requests they carried

    async def call(self, *args: Any) -> Any:
        """This request's result; its own error raised."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((args, future))
        if len(self.pending) == 1:
            asyncio.get_running_loop().create_task(self.flush())
        return await future

    async def flush(self) -> None:
        await asyncio.sleep(self.window_s)
        batch, self.pending = self.pending, []
        self.calls, self.batched = self.calls + 1, self.batched + len(batch)
        try:
            results = await self.method.remote([args for args, _ in batch])
        except Exception as exc:  # the call as a whole failed (a dead learner): every request
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
