"""Which device and dtype an actor computes on: the GPU Ray assigned it, else the CPU."""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags of CPUs with native bfloat16 matmuls (AVX512-BF16, AMX)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def model_dtype(dtype: str | None, gpu: bool) -> str:
    """model.dtype when set, else bfloat16 on a GPU and float32 on the CPU."""
    return dtype or ("bfloat16" if gpu else "float32")


def assigned_gpu_ids() -> list:
    """The GPUs Ray gave this actor (its CUDA_VISIBLE_DEVICES); none outside an actor (the
    driver and in-process use reserve no GPU, whatever the node has)."""
    import ray

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    return ray.get_gpu_ids() if in_actor else []


def pick_device(gpu_ids: list, dtype: str | None, cuda_available: bool) -> tuple[str, str]:
    """(device, dtype) for an actor holding `gpu_ids`: "cuda" is the first of them, since Ray
    narrowed CUDA_VISIBLE_DEVICES to the actor's own."""
    if not gpu_ids:
        return "cpu", model_dtype(dtype, gpu=False)
    if not cuda_available:
        raise RuntimeError(f"Ray assigned this actor GPUs {gpu_ids} but torch sees no CUDA "
                           "device: install a CUDA build of torch on the node (lorafleet[gpu])")
    return "cuda", model_dtype(dtype, gpu=True)


def actor_device(dtype: str | None) -> tuple[str, str]:
    """`pick_device` for the calling actor."""
    ids = assigned_gpu_ids()
    if not ids:
        return pick_device(ids, dtype, cuda_available=False)
    import torch

    return pick_device(ids, dtype, torch.cuda.is_available())


def autocast_dtype(setting: str, device: str, dtype: str) -> str | None:
    """The dtype of the learner's autocast matmuls (None: no autocast) for learner.autocast
    `setting` on `device` with weights in `dtype`: "bf16" always (on float32 weights), "auto"
    where the hardware multiplies bfloat16 natively, "off" never."""
    if setting == "off" or dtype != "float32":
        return None
    if setting == "bf16" or native_bf16(device):
        return "bfloat16"
    return None


def attention_kernel(setting: str | None, device: str) -> str | None:
    """The learner's attention kernel: model.attn_implementation when set; else "eager" on the
    CPU, where torch's fused CPU attention (sdpa) made the embedded model's bf16 GRPO update
    0.35 s instead of 0.20 s (no gain at 28M params, 64-token responses: `lorafleet bench
    vs-trl` times both); transformers' own choice (sdpa) on a GPU."""
    if setting is not None:
        return setting
    return "eager" if device == "cpu" else None


def native_bf16(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started, in MiB (Linux reports
    ru_maxrss in KiB); an actor's, asked through `__ray_call__`, covers its in-process
    vLLM engine too."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
