"""The Tinker service on lorafleet's fleet: every training client is an adapter on the
learner's one base model, every sampling client an adapter version served in memory by every
rollout worker, verified by the probe before its first sample.

Two loops share the fleet. The learner loop (here) runs one cycle at a time: the next ready
request of each client's lane (state.Lanes), at once, their forward_backward and optim_step
calls batched into one learner call (cycle.py, Tinker's clock cycle); a client that
queues many requests cannot hold back another's. The sampling loop (sampling.py) owns the
rollout workers. A reaper closes sessions that went silent."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ...common.client_records import CLIENT_LOSSES
from ...common.config import VLLM_LORA_RANKS, LoRAConfig
from ...common.records import AdapterSnapshot, GenerationRequest, ProbeResult, Prompt
from ..actor_group import ActorGroup
from . import wire
from .config import ATTENTION_MODULES, MLP_MODULES, ServeConfig
from .cycle import Batcher
from .sampling import SampleJob, SamplingLoop
from .state import (
    CALLER,
    Futures,
    Lanes,
    Op,
    Sampler,
    Session,
    TrainingModel,
    check_name,
    checkpoint_dir,
    checkpoint_path,
    error_text,
)
from .wire import BadRequest, Unsupported


class NotFound(LookupError):
    """A session, model, sampler or request this server does not hold (any more)."""


class TinkerService:
    def __init__(self, cfg: ServeConfig, model_name: str, tokenizer_id: str, learner,
                 rollout: ActorGroup, probe_ids: list[list[int]], tolerance: float) -> None:
        self.cfg, self.serve = cfg, cfg.serve
        self.model_name, self.tokenizer_id = model_name, tokenizer_id
        self.learner, self.rollout = learner, rollout
        self.probe_ids, self.tolerance = probe_ids, tolerance
        self.root = Path(cfg.run_dir) / "tinker"
        self.futures, self.lanes = Futures(), Lanes()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.adapter_ids = iter(range(1, 1 << 62))
        self.rng = random.Random(cfg.seed)
        self.sampling = SamplingLoop(learner, rollout, self.futures, probe_ids, tolerance,
                                     cfg.rollout.max_loras, cfg.serve.max_sample_batch)
        self.counts = {"forward_backward": 0, "optim_step": 0}
        # Tinker's clock cycle: the training requests of several clients in one learner call
        self.cycle = Batcher(learner.train_cycle, cfg.serve.cycle_s)

    # -- lookups ----------------------------------------------------------------------------
    def session(self, session_id: str) -> Session:
        if session_id not in self.sessions or self.sessions[session_id].owner != CALLER.get():
            raise NotFound(f"session {session_id!r} is not open on this server (closed, or "
                           f"idle for serve.idle_timeout_s={self.serve.idle_timeout_s:g} s)")
        session = self.sessions[session_id]
        session.touch()
        return session

    def model(self, model_id: str) -> TrainingModel:
        return self.owned(self.models, model_id, "training model")

    def sampler(self, sampler_id: str) -> Sampler:
        return self.owned(self.samplers, sampler_id, "sampling session")

    def owned(self, items: dict, key: str, what: str):
        """The caller's live model or sampler `key` (another key's is as absent), its
        session touched."""
        item = items.get(key)
        if item is None or item.owner != CALLER.get():
            raise NotFound(f"no {what} {key!r} on this server")
        if item.freed:
            raise NotFound(f"{what} {key!r} was freed: {item.freed}")
        self.session(item.session)
        return item

    def check_base_model(self, name: str | None) -> None:
        if name not in (self.model_name, self.cfg.model.name_or_path):
            raise BadRequest(f"base model {name!r}: this server serves {self.model_name!r} "
                             "(get_server_capabilities lists it)")

    # -- sessions ---------------------------------------------------------------------------
    def create_session(self) -> str:
        session = Session(uuid.uuid4().hex[:16])
        self.sessions[session.id] = session
        return session.id

    def close_session(self, session_id: str, reason: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        for model_id in session.models:
            model = self.models[model_id]
            if model.freed:
                continue
            model.freed = reason
            for op in self.lanes.close(model_id):
                self.futures.fail(op.request_id, f"training model {model_id!r} was freed: "
                                  f"{reason}")
            self.lanes.add(Lanes.ADMIN, Op(self.futures.create("unload_model"),
                                           lambda adapter=model.adapter: self.unload(adapter)))
        for sampler_id in session.samplers:
            self.samplers[sampler_id].free(reason)
        self.sampling.wake.set()
        print(f"session {session_id} closed: {reason}", flush=True)

    async def unload(self, adapter: str) -> dict:
        await self.learner.remove_policy.remote(adapter)
        return {}

    # -- training models --------------------------------------------------------------------
    def client_lora(self, lora: dict) -> tuple[LoRAConfig, bool, bool]:
        rank = int(lora.get("rank", 32))
        if rank not in VLLM_LORA_RANKS or rank > self.serve.max_lora_rank:
            raise BadRequest(f"LoRA rank {rank}: this server serves ranks "
                             f"{[r for r in VLLM_LORA_RANKS if r <= self.serve.max_lora_rank]}"
                             " (serve.max_lora_rank)")
        attn, mlp = lora.get("train_attn", True), lora.get("train_mlp", True)
        if lora.get("train_unembed", True) and self.serve.unembed == "error":
            raise Unsupported(
                "train_unembed=True: vLLM serves no LoRA on the LM head together with prompt "
                "log-probs; create the client with train_unembed=False, or start the server "
                "with serve.unembed=ignore to adapt attention and MLP only")
        if not (attn or mlp):
            raise BadRequest("train_attn and train_mlp are both off: nothing to adapt")
        modules = [*(ATTENTION_MODULES if attn else ()), *(MLP_MODULES if mlp else ())]
        return (LoRAConfig(rank=rank, alpha=self.serve.lora_alpha, target_modules=modules),
                attn, mlp)

    def create_model(self, body: dict, load: tuple[Path, bool] | None = None) -> str:
        """A new training client's adapter; `load`: from a saved state (directory, with the
        optimiser)."""
        session = self.session(body["session_id"])
        model_id = f"{session.id}:train:{body['model_seq_id']}"
        if model_id in self.models:
            raise BadRequest(f"training model {model_id!r} exists already")
        if load is None:
            self.check_base_model(body.get("base_model"))
            optimizer = (body.get("optimizer_config") or {}).get("type", "adamw")
            if optimizer != "adamw":
                raise Unsupported(f"optimizer {optimizer!r} (AdamW only)")
            lora, attn, mlp = self.client_lora(body.get("lora_config") or {"rank": 32})
            seed = (body.get("lora_config") or {}).get("seed")
        else:
            meta = json.loads((load[0] / "meta.json").read_text())
            lora, attn, mlp, seed = LoRAConfig(**meta["lora"]), meta["train_attn"], \
                meta["train_mlp"], meta["seed"]
        seed = self.rng.randrange(2**31) if seed is None else int(seed)
        request_id = self.futures.create("create_model")
        model = TrainingModel(model_id, session.id, "", lora, seed, attn, mlp)

        async def add() -> dict:
            if session.id not in self.sessions:  # closed while this request waited
                raise NotFound(f"session {session.id!r} was closed before its training "
                               "client was made")
            live = [m for m in self.models.values() if not m.freed and m.adapter]
            if len(live) >= self.serve.max_adapters:
                raise BadRequest(
                    f"the server holds serve.max_adapters={self.serve.max_adapters} training "
                    "clients already; close one (ServiceClient.close) or wait for an idle "
                    "session to be freed")
            model.adapter = f"client{next(self.adapter_ids)}"
            await self.learner.add_client_policy.remote(model.adapter, lora, seed)
            self.models[model_id] = model
            session.models.append(model_id)
            if load is not None:
                await self.learner.load_client_state.remote(model.adapter, str(load[0]), load[1])
            return {"model_id": model_id, "path": None}

        self.lanes.add(Lanes.ADMIN, Op(request_id, add))
        return request_id

    def info(self, model_id: str) -> dict:
        model = self.model(model_id)
        return {"type": "get_info", "model_id": model_id, "is_lora": True,
                "lora_rank": model.lora.rank, "model_name": self.model_name,
                "model_data": {"model_name": self.model_name, "tokenizer_id": self.tokenizer_id}}

    def learner_request(self, model_id: str, seq_id: int | None, kind: str,
                        prepare: Callable[[], Callable[[TrainingModel], Awaitable[Any]]]) -> str:
        """A request of model `model_id` in its lane at `seq_id`. `prepare` checks it and
        gives what runs it; a request that fails its checks still takes its place in the lane
        (as an error), so that the client's later requests do not wait for it."""
        model = self.model(model_id)
        request_id = self.futures.create(kind)
        try:
            run = prepare()
        except Exception as exc:
            async def run(_: TrainingModel, exc: Exception = exc) -> None:
                raise exc
        self.lanes.add(model_id, Op(request_id, lambda: run(model)), seq_id)
        return request_id

    def forward_backward(self, body: bytes, encoding: str | None) -> tuple[str, str]:
        call = wire.forward_backward_call(body, encoding)

        def prepare():
            if call.loss.name not in CLIENT_LOSSES:
                raise Unsupported(f"loss_fn {call.loss.name!r} (this server computes "
                                  f"{', '.join(CLIENT_LOSSES)}; forward_backward_custom works "
                                  "client-side)")

            async def run(model: TrainingModel) -> bytes:
                result = await self.cycle.call(
                    "forward_backward", model.adapter, call.datums, call.loss, call.forward_only)
                self.counts["forward_backward"] += 1
                return wire.forward_backward_output(result)

            return run

        kind = "forward" if call.forward_only else "forward_backward"
        return self.learner_request(call.model_id, call.seq_id, kind, prepare), call.model_id

    def optim_step(self, body: dict) -> str:
        def prepare():
            step = wire.adam_step(body)

            async def run(model: TrainingModel) -> dict:
                metrics = await self.cycle.call("optim_step", model.adapter, step)
                self.counts["optim_step"] += 1
                return {"metrics": metrics}

            return run

        return self.learner_request(body["model_id"], body.get("seq_id"), "optim_step", prepare)

    def save_state(self, body: dict) -> str:
        model_id = body["model_id"]

        def prepare():
            path = checkpoint_path(model_id, "weights", check_name(body.get("path"), "state"))
            directory = checkpoint_dir(self.root, path, ("weights",))[2]
            if directory.exists() and not body.get("overwrite"):
                raise BadRequest(f"{path} exists; save under another name or with "
                                 "overwrite=True")

            async def run(model: TrainingModel) -> dict:
                await self.learner.save_client_state.remote(model.adapter, str(directory), True)
                (directory / "meta.json").write_text(json.dumps(self.meta(model)))
                return {"path": path, "type": "save_weights"}

            return run

        return self.learner_request(model_id, body.get("seq_id"), "save_weights", prepare)

    def meta(self, model: TrainingModel) -> dict:
        return {"base_model": self.model_name, "model_id": model.id, "seed": model.seed,
                "owner": model.owner,
                "train_attn": model.train_attn, "train_mlp": model.train_mlp,
                "lora": {"rank": model.lora.rank, "alpha": model.lora.alpha,
                         "target_modules": list(model.lora.target_modules)}}

    def saved(self, path: str, kind: str, writer: str) -> tuple[Path, dict]:
        """The directory and meta.json of a saved state or sampler the caller may read."""
        directory = checkpoint_dir(self.root, path, (kind,))[2]
        meta_file = directory / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if meta is None or meta.get("owner", "") != CALLER.get():
            raise NotFound(f"no {kind.replace('_', ' ')} at {path} ({writer} writes them)")
        return directory, meta

    def state_dir(self, path: str) -> Path:
        return self.saved(path, "weights", "save_state")[0]

    def load_state(self, body: dict) -> str:
        if body.get("model_id") is None:  # create_training_client_from_state
            return self.create_model(body, (self.state_dir(body["path"]),
                                            bool(body.get("optimizer"))))

        def prepare():
            directory = self.state_dir(body["path"])
            meta = json.loads((directory / "meta.json").read_text())

            async def run(model: TrainingModel) -> dict:
                if meta["lora"]["rank"] != model.lora.rank or \
                        meta["lora"]["target_modules"] != list(model.lora.target_modules):
                    raise BadRequest(
                        f"{body['path']} holds a rank-{meta['lora']['rank']} LoRA of "
                        f"{meta['lora']['target_modules']}; this client's is rank "
                        f"{model.lora.rank} of {list(model.lora.target_modules)}")
                await self.learner.load_client_state.remote(model.adapter, str(directory),
                                                            bool(body.get("optimizer")))
                return {"path": body["path"], "model_id": model.id, "type": "load_weights"}

            return run

        return self.learner_request(body["model_id"], body.get("seq_id"), "load_weights",
                                    prepare)

    def save_for_sampler(self, body: dict) -> str:
        model_id, name = body["model_id"], body.get("path")

        def prepare():
            path = None if name is None else checkpoint_path(
                model_id, "sampler_weights", check_name(name, "sampler"))
            return lambda model: self.publish_sampler(model, body, path)

        return self.learner_request(model_id, body.get("seq_id"), "save_weights_for_sampler",
                                    prepare)

    async def publish_sampler(self, model: TrainingModel, body: dict, path: str | None) -> dict:
        """A sampler of the model's current weights, loaded on every worker and verified
        against the learner before the request completes; named: also saved to disk."""
        sampler_id = f"{model.session}:sample:{body.get('sampling_session_seq_id')}" \
            if path is None else f"{model.session}:sampler:{uuid.uuid4().hex[:8]}"
        # made in the learner loop, not in the request's context: the owner is the model's
        sampler = Sampler(sampler_id, model.session, self.model_name,
                          self.learner.publish.remote(model.adapter), model.id, path,
                          owner=model.owner)
        await self.sampling.verify(sampler, model.adapter)
        if model.freed:  # its session closed while the sampler was verified
            sampler.free(model.freed)
            raise NotFound(f"training model {model.id!r} was freed: {model.freed}")
        if path is None:
            self.samplers[sampler.id] = sampler
            self.sessions[model.session].samplers.append(sampler.id)
            self.free_old_samplers(model)
            return {"sampling_session_id": sampler.id, "type": "save_weights_for_sampler"}
        directory = checkpoint_dir(self.root, path, ("sampler_weights",))[2]
        (await sampler.snapshot).save_pretrained(directory)
        reference = sampler.reference
        (directory / "meta.json").write_text(json.dumps(self.meta(model) | {
            "reference": {"worker_id": 0, "adapter_version": reference.adapter_version,
                          "prompt_ids": reference.prompt_ids,
                          "response_ids": reference.response_ids,
                          "logprobs": reference.logprobs}}))
        return {"path": path, "type": "save_weights_for_sampler"}

    def free_old_samplers(self, model: TrainingModel) -> None:
        """A training client keeps its newest serve.samplers_per_client unnamed samplers."""
        keep = self.serve.samplers_per_client
        own = [s for s in self.samplers.values()
               if s.model_id == model.id and s.path is None and not s.freed]
        for sampler in own[:-keep]:
            sampler.free(f"its training client made {keep} newer samplers since "
                         "(serve.samplers_per_client)")

    # -- samplers ---------------------------------------------------------------------------
    def create_sampler(self, body: dict) -> str:
        import ray

        session = self.session(body["session_id"])
        sampler_id = f"{session.id}:sample:{body['sampling_session_seq_id']}"
        path = body.get("model_path")
        if path is None:
            self.check_base_model(body.get("base_model"))
            sampler = Sampler(sampler_id, session.id, self.model_name)
        else:
            directory, meta = self.saved(path, "sampler_weights", "save_weights_for_sampler")
            sampler = Sampler(sampler_id, session.id, self.model_name,
                              ray.put(AdapterSnapshot.load_pretrained(directory)),
                              meta["model_id"], path, ProbeResult(**meta["reference"]))
        self.samplers[sampler_id] = sampler
        session.samplers.append(sampler_id)
        return sampler_id

    def sample(self, body: dict) -> tuple[str, list[str]]:
        if body.get("sampling_session_id") is None:
            raise Unsupported("sample without a sampling session (create a SamplingClient)")
        sampler = self.sampler(body["sampling_session_id"])
        wire.check_sample_request(body)
        tokens = wire.prompt_tokens(body["prompt"])
        choice = wire.sampling_choice(body.get("sampling_params") or {})
        n, limit = int(body.get("num_samples", 1)), self.cfg.model.max_model_len
        max_tokens = choice.max_tokens or limit - len(tokens)
        if n < 1 or not tokens or max_tokens < 1 or len(tokens) + max_tokens > limit:
            raise BadRequest(f"{n} samples of {max_tokens} tokens after a {len(tokens)}-token "
                             f"prompt: needs num_samples >= 1, a prompt, and prompt + max_tokens"
                             f" <= model.max_model_len={limit}")
        last_n = body.get("prompt_logprobs_last_n")
        if last_n is not None and not 1 <= last_n <= len(tokens) - 1:
            raise BadRequest(f"prompt_logprobs_last_n={last_n} for a {len(tokens)}-token prompt")
        seed = choice.seed if choice.seed is not None else self.rng.randrange(2**31)
        request = GenerationRequest(
            sampler.slot, [Prompt(0, "", tokens, {})], n, choice.temperature, max_tokens, seed,
            choice.stop, choice.stop_token_ids, choice.top_p, choice.top_k,
            bool(body.get("prompt_logprobs")))
        request_id = self.futures.create("sample")
        self.sampling.submit(SampleJob(request_id, sampler, request, last_n))
        return request_id, [f"{request_id}:{k}" for k in range(n)]

    # -- the loops --------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self.learner_loop(), self.sampling.run(), self.reaper())

    async def learner_loop(self) -> None:
        """One cycle at a time: the next ready request of every lane, run at once (their
        learner calls batched: cycle.py)."""
        while True:
            ops = self.lanes.next_cycle()
            if not ops:
                self.lanes.wake.clear()
                await self.lanes.wake.wait()
                continue
            await asyncio.gather(*(self.run_op(op) for op in ops))

    async def run_op(self, op: Op) -> None:
        try:
            self.futures.resolve(op.request_id, await op.run())
        except Exception as exc:  # the client gets it as its request's error
            self.futures.fail(op.request_id, *error_text(exc))

    # -- silence ----------------------------------------------------------------------------
    async def reaper(self) -> None:
        idle = self.serve.idle_timeout_s
        while True:
            await asyncio.sleep(min(10.0, idle / 4))
            now = time.monotonic()
            for session in [s for s in self.sessions.values() if now - s.last_seen > idle]:
                self.close_session(session.id, f"no heartbeat or request for {idle:g} s "
                                   "(serve.idle_timeout_s)")
            for key, lane in list(self.lanes.lanes.items()):
                for op in lane.stalled(self.serve.seq_gap_timeout_s):
                    self.futures.fail(op.request_id, f"training model {key!r}: an earlier "
                                      f"request (seq_id {lane.next_seq}) never arrived within "
                                      f"serve.seq_gap_timeout_s={self.serve.seq_gap_timeout_s:g}"
                                      " s")

    def status(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions),
                "training_clients": sum(not m.freed for m in self.models.values()),
                "samplers": sum(not s.freed for s in self.samplers.values()),
                "resident_samplers": len(self.sampling.resident), **self.counts,
                # learner calls the cycles made, and the training requests they carried
                "learner_calls": self.cycle.calls, "learner_requests": self.cycle.batched,
                **self.sampling.counts}
