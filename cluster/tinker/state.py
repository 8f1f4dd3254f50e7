"""What the server keeps between requests: sessions, training models (a client's adapter on
the learner), samplers (a saved adapter served by the rollout workers), futures (the results
the SDK polls for) and the learner's lanes (each model's requests in seq_id order, taken in
turn). Plain asyncio-free bookkeeping, so it can be tested by itself."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...common.config import LoRAConfig
from ...common.records import ProbeResult
from .wire import BadRequest, Unsupported

TINKER = "tinker://"
# who sends the request being handled: its API key's id (`key_id`), "" on a server without keys;
# a session, and what it saved, answer only the key that opened it
CALLER: ContextVar[str] = ContextVar("caller", default="")


def key_id(key: str) -> str:
    """An API key's id: a digest, so that no key is kept in memory longer or written anywhere."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Session:
    id: str
    owner: str = field(default_factory=CALLER.get)  # the key_id that opened it
    last_seen: float = field(default_factory=time.monotonic)
    models: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)

    def touch(self) -> None:
        self.last_seen = time.monotonic()


@dataclass
class TrainingModel:
    """A training client: its adapter on the learner (`adapter`, the learner's policy name)."""

    id: str
    session: str
    adapter: str
    lora: LoRAConfig
    seed: int
    train_attn: bool
    train_mlp: bool
    freed: str | None = None  # why it is gone, once it is
    owner: str = field(default_factory=CALLER.get)  # the key_id of its session


@dataclass
class Sampler:
    """A sampling client's weights: a training model's adapter at one version (`snapshot`, an
    ObjectRef of its AdapterSnapshot) or the base model (snapshot None). `reference`: the
    probe result the learner verified when it was saved; every later load onto a worker must
    reproduce it."""

    id: str
    session: str
    base_model: str
    snapshot: Any = None
    model_id: str | None = None
    path: str | None = None  # tinker://... when saved under a name
    reference: ProbeResult | None = None
    freed: str | None = None
    owner: str = field(default_factory=CALLER.get)  # the key_id of its session

    @property
    def slot(self) -> str | None:
        """Its slot on the rollout workers (None: the base model, no adapter)."""
        return None if self.snapshot is None else self.id

    def free(self, reason: str) -> None:
        """No more samples; its weights leave the object store (and, once the sampling loop
        sees it, the workers)."""
        self.freed, self.snapshot = reason, None


@dataclass
class Future:
    """A request's result: JSON (a dict) or protobuf bytes, or an error message."""

    kind: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Any = None
    error: str | None = None
    category: str = "user"
    finished: float = 0.0


class Futures:
    def __init__(self, keep_s: float = 3600.0) -> None:
        self.items: dict[str, Future] = {}
        self.ids = itertools.count(1)
        self.keep_s = keep_s  # a finished result stays this long (a lost reply is polled again)

    def create(self, kind: str) -> str:
        self.expire()
        request_id = str(next(self.ids))
        self.items[request_id] = Future(kind)
        return request_id

    def resolve(self, request_id: str, result: Any) -> None:
        future = self.items[request_id]
        future.result, future.finished = result, time.monotonic()
        future.done.set()

    def fail(self, request_id: str, error: str, category: str = "user") -> None:
        future = self.items[request_id]
        future.error, future.category, future.finished = error, category, time.monotonic()
        future.done.set()

    def expire(self) -> None:
        now = time.monotonic()
        for request_id in [k for k, f in self.items.items()
                           if f.done.is_set() and now - f.finished > self.keep_s]:
            del self.items[request_id]


@dataclass
class Op:
    """A learner request: `run` does it and returns the future's result."""

    request_id: str
    run: Callable[[], Awaitable[Any]]
    arrived: float = field(default_factory=time.monotonic)


class Lane:
    """One model's learner requests, run in seq_id order (the SDK numbers each training
    client's requests from 1 and may send a batch's chunks out of order), or an unordered
    FIFO (`ordered` False: model creation and removal)."""

    def __init__(self, ordered: bool = True) -> None:
        self.ordered = ordered
        self.next_seq = 1
        self.waiting: dict[int, Op] = {}
        self.fifo: list[Op] = []

    def add(self, op: Op, seq_id: int | None = None) -> None:
        if not self.ordered:
            self.fifo.append(op)
            return
        if seq_id is None or seq_id < self.next_seq or seq_id in self.waiting:
            raise BadRequest(f"seq_id {seq_id} was already used by this training client "
                             f"(next expected {self.next_seq})")
        self.waiting[seq_id] = op

    def ready(self) -> Op | None:
        if not self.ordered:
            return self.fifo.pop(0) if self.fifo else None
        op = self.waiting.pop(self.next_seq, None)
        if op is not None:
            self.next_seq += 1
        return op

    def stalled(self, timeout_s: float) -> list[Op]:
        """Requests that waited over `timeout_s` for an earlier seq_id that never came."""
        now = time.monotonic()
        if self.next_seq in self.waiting or not self.waiting:
            return []
        if min(op.arrived for op in self.waiting.values()) > now - timeout_s:
            return []
        ops = list(self.waiting.values())
        self.waiting.clear()
        return ops

    def drain(self) -> list[Op]:
        ops = [*self.waiting.values(), *self.fifo]
        self.waiting.clear()
        self.fifo.clear()
        return ops


class Lanes:
    """The learner's lanes, taken in turn: one request of each lane with one ready per cycle,
    so a client that queues many requests cannot hold back another's."""

    ADMIN = ""  # creation and removal of adapters

    def __init__(self) -> None:
        self.lanes: OrderedDict[str, Lane] = OrderedDict({self.ADMIN: Lane(ordered=False)})
        self.wake = asyncio.Event()

    def add(self, key: str, op: Op, seq_id: int | None = None) -> None:
        self.lanes.setdefault(key, Lane())
        self.lanes[key].add(op, seq_id)
        self.wake.set()

    def next_cycle(self) -> list[Op]:
        """A cycle's requests: the next ready one of every lane (at most one each, so a
        client's run in order), the lanes taken in turn."""
        ops = []
        for key in list(self.lanes):
            op = self.lanes[key].ready()
            if op is not None:
                self.lanes.move_to_end(key)  # its turn is over
                ops.append(op)
        return ops

    def close(self, key: str) -> list[Op]:
        lane = self.lanes.pop(key, None)
        return lane.drain() if lane is not None else []


def error_text(exc: BaseException) -> tuple[str, str]:
    """(message, category) of a failed request: the actor's own error for a Ray task error."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, Unsupported):
        return f"not supported by lorafleet serve: {cause}", "user"
    category = "user" if isinstance(cause, (ValueError, LookupError)) else "server"
    return f"{type(cause).__name__}: {cause}", category


def checkpoint_path(model_id: str, kind: str, name: str) -> str:
    return f"{TINKER}{model_id}/{kind}/{name}"


def checkpoint_dir(root: Path, path: str, kinds: tuple[str, ...]) -> tuple[str, str, Path]:
    """tinker://MODEL/KIND/NAME -> (model id, kind, directory under `root`)."""
    if not path.startswith(TINKER):
        raise BadRequest(f"{path!r}: a checkpoint path starts with {TINKER}")
    parts = path[len(TINKER):].split("/")
    if len(parts) != 3 or parts[1] not in kinds or any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"{path!r}: expected {TINKER}<model id>/<{'|'.join(kinds)}>/<name>")
    model_id, kind, name = parts
    return model_id, kind, root / model_id.replace(":", "_") / kind / name


def check_name(name: str | None, what: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise BadRequest(f"{what} name {name!r}: a non-empty name without '/'")
    return name
