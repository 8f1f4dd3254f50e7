"""A vLLM engine that serves the policy as a LoRA adapter swapped in memory.

`load_snapshot` hands the adapter's tensors straight to vLLM's worker-side LoRA manager through
`collective_rpc` (no file, no engine restart). This touches vLLM internals
(`model_runner.lora_manager._adapter_manager`), so pyproject pins the vLLM range and
tests/ray/test_hot_swap.py proves a swap changes the outputs and equals loading from disk.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.cache import cache_root
from ..common.devices import actor_device
from ..common.logs import apply_log_level, quiet
from ..common.records import (
    POLICY,
    AdapterSnapshot,
    GenerationRequest,
    ProbeResult,
    Prompt,
    Rollout,
)
from ..common.specs import EngineSpec
from ..common.startup import TimedStart, clock, fresh_clock
from .eager_ranks import install as install_eager_ranks
from .lora_kernels import install as install_lora_kernels

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

# Zero-copy tensors from the object store are read-only views; we only ever clone them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

def level_slot(level: int) -> str:
    """The slot of meet level `level`'s adapter."""
    return f"level{level}"


def configure_vllm_env(kv_cache_gib: int, threads: int) -> None:
    """Must run before `import vllm`: CPU vLLM reads these at import/engine start."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # In-process engine: starts in ~2 s instead of ~18 s and does not take a core for itself.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    # Ray pins OMP_NUM_THREADS=1 in 1-CPU actors; set the engine's share on purpose instead.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    apply_log_level()  # vLLM reads VLLM_LOGGING_LEVEL at import


def _swap_lora_in_worker(worker, lora_id: int, tensors: dict, peft_config: dict) -> int:
    """Runs inside the vLLM worker: replace adapter `lora_id` by these tensors, in memory.

    Mirrors `LRUCacheWorkerLoRAManager.add_adapter` with `from_lora_tensors` in place of the
    disk read."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    helper = PEFTHelper.from_dict(peft_config)
    helper.validate_legal(manager.lora_config)
    mapper = getattr(adapters.model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_model_id=lora_id, tensors=tensors, peft_helper=helper, device="cpu",
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
    )
    supported = set(adapters.supported_lora_modules)
    for packed in adapters.packed_modules_mapping.values():
        supported.update(packed)
    unknown = sorted(name for name in lora.loras if name.rsplit(".", 1)[-1] not in supported)
    if unknown:  # vLLM would silently skip them: a partial (wrong) policy
        raise ValueError(f"adapter targets modules vLLM cannot apply LoRA to: {unknown[:5]}")
    adapters.remove_adapter(lora_id)
    adapters.add_adapter(lora)
    # Pinned in the CPU cache: vLLM's LRU may evict only adapters it can read back from disk
    # (ours has no file), i.e. those of `lora_from_disk`.
    adapters._pin_lora_in_cpu_cache(lora_id)
    adapters.activate_adapter(lora_id)
    return len(lora.loras)


def _remove_lora_in_worker(worker, lora_id: int) -> bool:
    """Runs inside the vLLM worker: free adapter `lora_id`'s GPU slot and CPU cache place."""
    return worker.model_runner.lora_manager._adapter_manager.remove_adapter(lora_id)


def _embed_tokens(worker, token_ids: list) -> list:
    """Runs inside the vLLM worker: the model's input embeddings of each id tensor, from the
    embedding layer itself (its LoRA wrapper's forward needs the batch's LoRA mapping)."""
    import torch

    layer = next(m for name, m in worker.model_runner.model.named_modules()
                 if name.endswith("embed_tokens"))
    layer = getattr(layer, "base_layer", layer)
    with torch.no_grad():
        return [layer(ids.to(worker.device)).cpu() for ids in token_ids]


def engine_args(spec: EngineSpec, dtype: str, gpu: bool) -> dict:
    """vLLM's `LLM(...)` keywords. The GPU ones only on a GPU: the CPU build sizes its KV
    cache by VLLM_CPU_KVCACHE_SPACE and has no tensor parallelism here. `prompt_embeds`:
    accept prompts as embeddings (meet's soft prompts), only when asked."""
    max_model_len, max_loras = spec.max_model_len, spec.max_loras
    tensor_parallel_size = spec.tensor_parallel_size
    gpu_memory_utilization = spec.gpu_memory_utilization
    args = dict(
        model=spec.model_path, dtype=dtype, max_model_len=max_model_len, seed=spec.seed,
        enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=max_loras,
        # The slots' adapters (at most max_loras, pinned) and one from disk beside them.
        max_cpu_loras=max_loras + 1,
        enable_prefix_caching=True,
        # A partly prefilled request with a per-request seed crashes vllm-cpu 0.32
        # ("CPU Generator does not use offset"): prefill every prompt whole.
        enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192),
        use_tqdm_on_load=not quiet(),
    )
    if spec.prompt_embeds:
        args["enable_prompt_embeds"] = True
    if spec.lora_target_modules is not None:
        args["lora_target_modules"] = list(spec.lora_target_modules)
    if not gpu:
        if tensor_parallel_size > 1 or gpu_memory_utilization is not None:
            raise ValueError("tensor_parallel_size and gpu_memory_utilization need a GPU worker "
                             "(rollout.num_gpus_per_worker > 0)")
        return args
    if gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    if spec.colocated:  # the KV cache freed while the learner trains (cluster/colocated.py)
        args["enable_sleep_mode"] = True
    if tensor_parallel_size > 1:
        # Shards in processes on this actor's own GPUs (Ray set CUDA_VISIBLE_DEVICES to the
        # tensor_parallel_size GPUs of its bundle), not in Ray actors of the run's placement
        # group, whose other bundles belong to the learner and the other workers.
        args |= {"tensor_parallel_size": tensor_parallel_size,
                 "distributed_executor_backend": "mp"}
    return args


# What a job may ask of an engine built for another as at most what it was built with: an
# adapter of lower rank, fewer adapters at once, shorter sequences give the same outputs.
AT_MOST = ("max_model_len", "max_lora_rank", "max_loras")
# The engine's own seed draws nothing here (every request carries its seed): any will do.
ANY = ("seed",)


def engine_fits(built: EngineSpec, asked: EngineSpec) -> list[str]:
    """What an engine built from `built` lacks to serve a job that asks for `asked`; [] when
    it serves that job exactly as an engine built for it would."""
    problems = []
    for name in EngineSpec.__dataclass_fields__:
        have, want = getattr(built, name), getattr(asked, name)
        if name in ANY or have == want or (name in AT_MOST and want <= have):
            continue
        bound = f" (needs at most {have!r})" if name in AT_MOST else ""
        problems.append(f"{name}: the engine has {have!r}, the job asks {want!r}{bound}")
    return problems


def sampling_params(request: GenerationRequest) -> list[SamplingParams]:
    """vLLM's sampling parameters of each of the request's prompts, seeded by prompt."""
    from vllm import SamplingParams

    return [
        SamplingParams(
            n=request.n, temperature=request.temperature, max_tokens=request.max_tokens,
            logprobs=0, seed=request.seed + p.index, skip_special_tokens=True,
            stop=list(request.stop) or None, stop_token_ids=list(request.stop_token_ids) or None,
            top_p=request.top_p, top_k=request.top_k,
            prompt_logprobs=0 if request.prompt_logprobs else None,
        )
        for p in request.prompts
    ]


def prompt_token_logprobs(token_ids: list[int], steps: list) -> list[float]:
    """vLLM's prompt log-probs (per position a dict holding the prompt's own token, None at
    the first) as the log-prob of each prompt token, NaN at the first."""
    return [math.nan if step is None else step[token].logprob
            for token, step in zip(token_ids, steps, strict=True)]


class AdapterMissing(RuntimeError):
    """Asked to sample an adapter the worker does not hold: after a restart that the driver
    has not seen yet, the worker holds none."""


class RolloutWorker(TimedStart):
    """One vLLM engine with LoRA enabled, serving adapters in named slots: each policy's, and
    (meet stage) each level's adapter beside the policy, `max_loras` at once, chosen per
    request; a slot whose snapshot has a soft prompt puts it before every prompt (vLLM's
    prompt_embeds, enabled by `prompt_embeds`). The driver runs it as a Ray actor
    (`ray.remote(RolloutWorker)`); tests use it in-process."""

    def __init__(self, spec: EngineSpec, worker_id: int = 0) -> None:
        startup = clock(self)
        configure_vllm_env(spec.kv_cache_gib, spec.threads_per_worker)
        import torch
        from vllm import LLM

        startup.lap("torch and vLLM imports")
        # The imports' objects (torch's, transformers', vLLM's) live as long as the process:
        # frozen out of the collector now, as vLLM freezes its heap once the engine is up,
        # the collections the engine's start runs skip them (1.3 s on 2 cores).
        gc.freeze()

        torch.set_num_threads(spec.threads_per_worker)
        self.engine_spec = spec  # what the engine was built from (a learner's spec is .spec)
        self.worker_id = worker_id
        device, dtype = actor_device(spec.dtype)
        if device == "cpu":
            install_lora_kernels()
            install_eager_ranks()
        args = engine_args(spec, dtype, gpu=device != "cpu")
        self.llm: LLM = LLM(**args)
        startup.lap("vLLM engine")
        self.sleeps = args.get("enable_sleep_mode", False)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_loras = spec.max_loras
        self.served: dict[str, tuple[LoRARequest, int]] = {}  # slot -> (request, version)
        # vLLM's adapter id of each slot (replaced in place on every load) and of each
        # adapter read from disk: never reused, so an id never names two adapters
        self.slot_ids: dict[str, int] = {}
        self.lora_ids = itertools.count(1)
        self.soft_prompts: dict[str, object] = {}  # slot -> [prompt_tokens, hidden] tensor

    # -- a warm fleet's engine, lent to one job after another (cluster/warm.py) --------------
    def attach(self, spec: EngineSpec) -> None:
        """Serves a new job whose engine is `spec`: this engine must fit it
        (`engine_fits`); every adapter of the job before is dropped."""
        startup = fresh_clock(self)
        self.attach_engine(spec)
        startup.lap("engine attached")

    def attach_engine(self, spec: EngineSpec) -> None:
        problems = engine_fits(self.engine_spec, spec)
        if problems:
            raise ValueError(f"rollout worker {self.worker_id}'s engine does not fit the job: "
                             + "; ".join(problems))
        RolloutWorker.detach(self)  # its own slots only: a colocated learner stays
        self.max_loras = spec.max_loras

    def detach(self) -> None:
        """Every slot dropped and the prefix cache emptied: nothing of the job stays served."""
        for slot in list(self.slot_ids):
            self.drop_slot(slot)
        self.llm.reset_prefix_cache()

    @property
    def adapter_version(self) -> int:
        """The policy's version; -1: base model only."""
        return self.served[POLICY][1] if POLICY in self.served else -1

    # -- adapters -------------------------------------------------------------------------
    def load_snapshot(self, snapshot: AdapterSnapshot, slot: str = POLICY) -> float:
        """Hot-swap the adapter of `slot` in memory; returns the seconds it took. A new slot
        takes one of the engine's `max_loras` adapter places for good."""
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        snapshot.verify()
        if slot not in self.slot_ids and len(self.slot_ids) >= self.max_loras:
            raise ValueError(
                f"rollout worker {self.worker_id} serves at most max_loras={self.max_loras} "
                f"adapters at once, in slots {list(self.slot_ids)}: no place for slot {slot!r}")
        # vLLM scales lora_B in place while loading: hand it copies, never the snapshot's own
        # tensors (in-process they would be corrupted; from the object store they are shared).
        tensors = {name: t.clone() for name, t in snapshot.tensors.items()}
        if slot not in self.slot_ids:
            self.slot_ids[slot] = next(self.lora_ids)
        lora_id = self.slot_ids[slot]
        self.llm.collective_rpc(_swap_lora_in_worker, args=(lora_id, tensors, snapshot.peft_config))
        if snapshot.soft_prompt is not None:
            self.soft_prompts[slot] = snapshot.soft_prompt.clone()
        else:
            self.soft_prompts.pop(slot, None)
        # Cached KV blocks were computed by the previous adapter: drop them.
        self.llm.reset_prefix_cache()
        # A distinct name/path per version keeps any per-LoRA cache key distinct too.
        self.served[slot] = (LoRARequest(
            f"{slot}-v{snapshot.version}", lora_id, f"mem://{slot}/v{snapshot.version}"
        ), snapshot.version)
        return time.perf_counter() - start

    def drop_slot(self, slot: str) -> None:
        """Stop serving `slot` and free its place for another adapter (a slot not served is
        left as it is)."""
        if slot not in self.slot_ids:
            return
        self.llm.collective_rpc(_remove_lora_in_worker, args=(self.slot_ids.pop(slot),))
        self.served.pop(slot, None)
        self.soft_prompts.pop(slot, None)

    def lora_from_disk(self, directory: str | Path) -> LoRARequest:
        """A request that makes vLLM read an adapter directory itself (for comparisons)."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self.lora_ids)
        return LoRARequest(f"disk-{lora_id}", lora_id, str(directory))

    def served_adapter(self, slot: str) -> tuple[LoRARequest, int]:
        """The request and version of the adapter in `slot`; never the base model in its
        place."""
        if slot not in self.served:
            raise AdapterMissing(
                f"rollout worker {self.worker_id} (pid {os.getpid()}) serves no adapter in slot "
                f"{slot!r}: none was loaded there since this process started")
        return self.served[slot]

    # -- generation -----------------------------------------------------------------------
    def generate_requests(self, requests: list[GenerationRequest]) -> list[list[Rollout]]:
        """Each request's samples from its slot's adapter (slot None: the base model), all in
        one engine call so vLLM batches across adapters; a rollout carries its slot as its
        policy and the slot's version. A slot with a soft prompt is sampled alone, by
        `generate`."""
        from vllm.inputs import TokensPrompt

        served = [(None, -1) if r.slot is None else self.served_adapter(r.slot)
                  for r in requests]
        soft = [r.slot for r in requests if r.slot in self.soft_prompts]
        if soft:
            raise ValueError(f"slots {soft} put a soft prompt before every prompt: sample each "
                             "alone with generate(slot=...)")
        outputs = iter(self.llm.generate(
            [TokensPrompt(prompt_token_ids=p.token_ids) for r in requests for p in r.prompts],
            [params for r in requests for params in sampling_params(r)],
            lora_request=[lora for r, (lora, _) in zip(requests, served, strict=True)
                          for _ in r.prompts],
            use_tqdm=False,
        ))
        return [self.rollouts(r, [next(outputs) for _ in r.prompts], version)
                for r, (_, version) in zip(requests, served, strict=True)]

    def generate(
        self, prompts: list[Prompt], *, n: int, temperature: float, max_tokens: int, seed: int,
        lora: LoRARequest | None = None, use_policy: bool = True, slot: str = POLICY,
        stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
    ) -> list[Rollout]:
        """n samples per prompt with vLLM's logprob of every sampled token; a sample also
        ends at a `stop` string (cut from its text) or a `stop_token_ids` token.

        `slot`: the served adapter to sample (a policy's, or a meet level's); `lora`: an
        adapter from disk instead; use_policy=False: the base model. Each prompt gets its own
        sampling seed (seed + prompt.index), so a prompt's samples do
        not depend on which worker or batch it landed in."""
        from vllm.inputs import TokensPrompt

        request = GenerationRequest(slot, prompts, n, temperature, max_tokens, seed,
                                    tuple(stop or ()), tuple(stop_token_ids or ()))
        if lora is not None or not use_policy:
            return self.rollouts(request, self.llm.generate(
                [TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts],
                sampling_params(request), lora_request=lora, use_tqdm=False,
            ), version=-1)
        soft_prompt = self.soft_prompts.get(slot)
        if soft_prompt is None:
            return self.generate_requests([request])[0]
        served, version = self.served_adapter(slot)
        params = sampling_params(request)
        outputs = [out for group in self.prefill_groups(prompts, n, len(soft_prompt))
                   for out in self.llm.generate(
                       self.embedded([prompts[i] for i in group], soft_prompt),
                       [params[i] for i in group], lora_request=served, use_tqdm=False)]
        return self.rollouts(request, outputs, version)

    def rollouts(self, request: GenerationRequest, outputs: list[RequestOutput], version: int
                 ) -> list[Rollout]:
        """vLLM's outputs of the request's prompts as rollouts of its slot at `version`."""
        rollouts = []
        for prompt, output in zip(request.prompts, outputs, strict=True):
            prompt_logprobs = (prompt_token_logprobs(prompt.token_ids, output.prompt_logprobs)
                               if request.prompt_logprobs else None)
            for k, completion in enumerate(output.outputs):
                ids = list(completion.token_ids)
                steps = zip(ids, completion.logprobs, strict=True)
                logprobs = [step[tok].logprob for tok, step in steps]
                rollouts.append(Rollout(
                    prompt=prompt, sample_index=k, response_ids=ids,
                    response_text=completion.text, logprobs=logprobs,
                    finish_reason=completion.finish_reason or "length",
                    adapter_version=version, worker_id=self.worker_id, policy=request.slot,
                    prompt_logprobs=prompt_logprobs,
                ))
        return rollouts

    def prefill_groups(self, prompts: list[Prompt], n: int, prefix: int) -> list[range]:
        """Groups of prompts whose n samples' prefills all fit in one engine step. With LoRA,
        vllm-cpu 0.32 embeds only the token-id positions of a step that mixes them with
        prompt_embeds positions (a late prefill beside earlier requests' decoding) against a
        LoRA mapping of all positions: "RuntimeError: einsum(): subscript b has size 269 for
        operand 1 which does not broadcast with previously seen size 255". One generate call
        per group keeps every step all prefills (the first) or all decoding."""
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        longest = prefix + max(len(p.token_ids) for p in prompts)
        size = min(scheduler.max_num_seqs // n, scheduler.max_num_batched_tokens // (n * longest))
        if size < 1:
            raise ValueError(f"{n} samples of a {longest}-token soft-prompted prompt do not fit "
                             f"one engine step (max_num_seqs {scheduler.max_num_seqs}, "
                             f"max_num_batched_tokens {scheduler.max_num_batched_tokens})")
        return [range(i, min(i + size, len(prompts))) for i in range(0, len(prompts), size)]

    def embedded(self, prompts: list[Prompt], soft_prompt) -> list[dict]:
        """The prompts as vLLM prompt_embeds: the soft prompt, then the model's own embeddings
        of the prompt's tokens."""
        import torch

        tokens = self.llm.collective_rpc(_embed_tokens, args=(
            [torch.tensor(p.token_ids) for p in prompts],))[0]
        return [{"prompt_embeds": torch.cat([soft_prompt.to(t.dtype), t])} for t in tokens]

    def probe(self, prompt_ids: list[list[int]], max_tokens: int, slot: str = POLICY
              ) -> ProbeResult:
        """Greedy continuation of the fixed probe under the adapter of `slot`."""
        prompts = [Prompt(i, "", ids, {}) for i, ids in enumerate(prompt_ids)]
        rollouts = self.generate(prompts, n=1, temperature=0.0, max_tokens=max_tokens, seed=0,
                                 slot=slot)
        return ProbeResult(
            worker_id=self.worker_id, adapter_version=self.served.get(slot, (None, -1))[1],
            prompt_ids=prompt_ids, response_ids=[r.response_ids for r in rollouts],
            logprobs=[r.logprobs for r in rollouts],
        )
