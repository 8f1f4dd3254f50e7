"""The rollout workers' side of the Tinker service: samplers' adapters loaded on every worker
(at most rollout.max_loras at once, the least recently used leaving first), each load verified
by the probe (against the learner for a new sampler, against the result the learner verified
for a reload), and the clients' samples in rounds: pending samples taken in turn from each
session, up to serve.max_sample_batch sequences, one engine call per worker so vLLM batches
the clients' adapters together. One loop does all of it, so nothing else touches the workers'
adapters."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ...common.records import GenerationRequest, ProbeResult
from ...learner.core import SyncError
from ..actor_group import ActorGroup
from . import wire
from .state import Futures, Sampler, error_text

PROBE_MAX_TOKENS = 8


@dataclass
class SampleJob:
    request_id: str
    sampler: Sampler
    request: GenerationRequest
    last_n: int | None
    arrived: float = field(default_factory=time.monotonic)


def check_reproduces(reference: ProbeResult, probes: list[ProbeResult], tolerance: float,
                     what: str) -> None:
    """Every worker's probe of a reloaded adapter equals the one the learner verified."""
    for probe in probes:
        same = probe.response_ids == reference.response_ids
        # the same tokens: as many log-probs
        gap = max((abs(a - b) for got, want in zip(probe.logprobs, reference.logprobs,
                                                   strict=True)
                   for a, b in zip(got, want, strict=True)), default=0.0) if same \
            else float("inf")
        if gap > tolerance:
            raise SyncError(f"rollout worker {probe.worker_id} serves {what} unlike the "
                            f"weights the learner verified (probe gap {gap:.3g}, tolerance "
                            f"{tolerance:g}): the adapter load did not take effect")


class SamplingLoop:
    def __init__(self, learner, rollout: ActorGroup, futures: Futures, probe_ids: list[list[int]],
                 tolerance: float, max_loras: int, max_batch: int) -> None:
        self.learner, self.rollout, self.futures = learner, rollout, futures
        self.probe_ids, self.tolerance = probe_ids, tolerance
        self.max_loras, self.max_batch = max_loras, max_batch
        # new samplers to verify, and each session's samples
        self.verifications: deque[tuple[Sampler, str, asyncio.Future]] = deque()
        self.samples: OrderedDict[str, deque[SampleJob]] = OrderedDict()
        self.wake = asyncio.Event()
        self.resident: OrderedDict[str, Sampler] = OrderedDict()  # slots on every worker
        rollout.revive = self.revive_worker
        self.counts = {"samples": 0, "loads": 0, "evictions": 0}

    async def verify(self, sampler: Sampler, adapter: str) -> None:
        """Load a new sampler of the learner's adapter `adapter` on every worker and check
        its probes against the learner (the adapter's requests wait for this)."""
        done = asyncio.get_running_loop().create_future()
        self.verifications.append((sampler, adapter, done))
        self.wake.set()
        await done

    def submit(self, job: SampleJob) -> None:
        self.samples.setdefault(job.sampler.session, deque()).append(job)
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.verifications or any(self.samples.values()):
                if self.verifications:
                    sampler, adapter, done = self.verifications.popleft()
                    try:
                        await asyncio.to_thread(self.verify_new, sampler, adapter)
                        done.set_result(None)
                    except Exception as exc:
                        done.set_exception(exc)
                    continue
                await self.sample_round()

    def take_round(self) -> list[SampleJob]:
        """Pending samples in turn from each session, up to serve.max_sample_batch sequences
        and rollout.max_loras adapters; a freed sampler's samples fail."""
        jobs, sequences, slots = [], 0, set()
        while any(self.samples.values()) and sequences < self.max_batch:
            session, queue = next((k, q) for k, q in self.samples.items() if q)
            job = queue[0]
            if job.sampler.freed:
                queue.popleft()
                self.futures.fail(job.request_id, f"sampling session {job.sampler.id!r} was "
                                  f"freed: {job.sampler.freed}")
                continue
            slot = job.sampler.slot
            if slot is not None and slot not in slots and \
                    len(slots) >= self.max_loras:
                break
            queue.popleft()
            self.samples.move_to_end(session)
            slots.discard(None)
            if slot is not None:
                slots.add(slot)
            jobs.append(job)
            sequences += job.request.n
        return jobs

    async def sample_round(self) -> None:
        jobs = self.take_round()
        if not jobs:
            return
        try:
            samplers = {job.sampler.id: job.sampler for job in jobs if job.sampler.slot}
            await asyncio.to_thread(self.make_resident, list(samplers.values()))
            workers = len(self.rollout.actors)
            parts: dict[int, list[GenerationRequest]] = {i: [] for i in range(workers)}
            owner, load = [], [0] * workers
            for job in sorted(jobs, key=lambda j: -j.request.n):  # largest first, least loaded
                i = load.index(min(load))
                load[i] += job.request.n
                parts[i].append(job.request)
                owner.append((i, len(parts[i]) - 1, job))
            busy = {i: part for i, part in parts.items() if part}
            results = await asyncio.to_thread(
                self.rollout.call, "generate_requests", lambda part: (part,), busy)
            by_worker = dict(zip(busy, results, strict=True))
            for i, k, job in owner:
                rollouts = by_worker[i][k]
                self.futures.resolve(job.request_id, wire.sample_response(
                    rollouts, job.request.prompt_logprobs, job.last_n))
                self.counts["samples"] += 1
        except Exception as exc:
            message, category = error_text(exc)
            for job in jobs:
                if not self.futures.items[job.request_id].done.is_set():
                    self.futures.fail(job.request_id, message, category)

    # -- adapters on the rollout workers (the sampling loop's thread) ----------------------
    def probe(self, slot: str, workers: list[int] | None = None) -> list[ProbeResult]:
        items = None if workers is None else dict.fromkeys(workers)
        return self.rollout.call(
            "probe", lambda _: (self.probe_ids, PROBE_MAX_TOKENS, slot), items)

    def load(self, sampler: Sampler, workers: list[int] | None = None) -> list[ProbeResult]:
        items = None if workers is None else dict.fromkeys(workers)
        self.rollout.call("load_snapshot", lambda _: (sampler.snapshot, sampler.slot), items)
        self.counts["loads"] += 1
        return self.probe(sampler.slot, workers)

    def make_room(self, keep: set[str]) -> None:
        for sampler_id in [k for k, s in self.resident.items() if s.freed]:
            self.evict(sampler_id)
        while len(self.resident) >= self.max_loras:
            self.evict(next(k for k in self.resident if k not in keep))

    def evict(self, sampler_id: str) -> None:
        self.resident.pop(sampler_id)
        self.rollout.call("drop_slot", lambda _: (sampler_id,))
        self.counts["evictions"] += 1

    def verify_new(self, sampler: Sampler, adapter: str) -> None:
        """Load a new sampler on every worker and check its probes against the learner, whose
        weights are the snapshot's (the model's requests wait for this)."""
        import ray

        self.make_room(set())
        probes = self.load(sampler)
        ray.get(self.learner.check_probe.remote(probes, self.tolerance, adapter))
        sampler.reference = probes[0]
        self.resident[sampler.id] = sampler

    def make_resident(self, samplers: list[Sampler]) -> None:
        keep = {s.id for s in samplers}
        for sampler in samplers:
            if sampler.id in self.resident:
                self.resident.move_to_end(sampler.id)
                continue
            self.make_room(keep)
            check_reproduces(sampler.reference, self.load(sampler), self.tolerance,
                             f"sampler {sampler.id!r}")
            self.resident[sampler.id] = sampler

    def revive_worker(self, i: int) -> None:
        """A restarted rollout worker gets every resident sampler back, each verified."""
        for sampler in self.resident.values():
            check_reproduces(sampler.reference, self.load(sampler, [i]), self.tolerance,
                             f"sampler {sampler.id!r}")
