"""Which device and dtype an actor computes on: the GPU Ray assigned it, else the CPU."""

from __future__ import annotations


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
