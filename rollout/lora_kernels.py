"""LoRA matmuls for vLLM's CPU engine, one matmul per adapter in the batch.

vLLM's CPU punica path (`vllm.lora.ops.torch_ops`) gathers every token's LoRA weights
(`weights[indices]`: a tokens x out x rank copy) and multiplies token by token (an einsum
batched over tokens). A batch holds a few adapters at most (one per policy or meet level), so
the same products grouped by adapter are a handful of plain matmuls, with no copy: on the
embedded model this was 43% of generation in a profile (`docs/benchmarks.md#lorafleet-vs-trl`).
The functions keep vLLM's signatures and semantics (an index of -1, "no adapter", selects the
last slot, as torch indexing does there; vLLM keeps that slot zero), and `install` puts them in
place of vLLM's; tests/ray/test_lora_kernels.py compares them with vLLM's own."""

from __future__ import annotations

import torch

KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Row t of `inputs` times weights[indices[t]] transposed ([tokens, in] -> [tokens,
    out]), one matmul per distinct index, in `dtype`."""
    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    first = indices[:1]
    if bool((indices == first).all()):  # one adapter (or none) for the whole batch
        return inputs @ weights[int(first)].to(dtype).T
    out = inputs.new_empty(inputs.shape[0], weights.shape[1])
    for index in torch.unique(indices).tolist():
        rows = indices == index
        out[rows] = inputs[rows] @ weights[index].to(dtype).T
    return out


def grouped(original):
    """vLLM's kernel `original`, its products computed by `lora_products` where the batch
    has one index per input row (vLLM's own code otherwise)."""

    def kernel(inputs, weights, output, indices, *args, **kwargs):
        if indices.numel() != inputs.shape[0] or inputs.shape[0] == 0:
            return original(inputs, weights, output, indices, *args, **kwargs)
        products = lora_products(inputs, weights, indices, output.dtype)
        return finish(original.__name__, products, output, *args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = original.__name__
    kernel.vllm_original = original
    return kernel


def finish(name: str, products: torch.Tensor, output: torch.Tensor, *args, **kwargs) -> None:
    """What vLLM's kernel `name` does with its products: scale into the output's first
    columns (shrink), add or write them (expand), into a column slice (expand_slice)."""
    if name == "bgmv_shrink":
        scaling = args[0] if args else kwargs.get("scaling", 1.0)
        output[:, : products.shape[1]] = scaling * products
        return
    if name == "bgmv_expand":
        add_inputs = args[0] if args else kwargs.get("add_inputs", True)
        columns = min(products.shape[1], output.shape[1])  # adapter and model pad differently
        # vLLM's: a single row of products goes to every output row
        rows = 1 if products.shape[0] == 1 and output.shape[0] != 1 else output.shape[0]
        target, products = output[:, :columns], products[:rows]
    else:
        offset, size = args[:2] if len(args) >= 2 else (kwargs["slice_offset"],
                                                         kwargs["slice_size"])
        add_inputs = args[2] if len(args) > 2 else kwargs.get("add_inputs", True)
        target, columns = output[:, offset: offset + size], products.shape[1]
    if add_inputs:
        target += products[:, :columns]
    else:
        target[:] = products[:, :columns]


def install() -> None:
    """vLLM's CPU LoRA kernels replaced by the grouped ones, where vLLM looks them up: the
    ops module (its sgmv_* call them by name) and the CPU punica wrapper (it imported them)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in KERNELS:
        current = getattr(lora_ops, name)
        if hasattr(current, "vllm_original"):
            continue  # installed already
        kernel = grouped(current)
        setattr(lora_ops, name, kernel)
        setattr(punica_cpu, name, kernel)
