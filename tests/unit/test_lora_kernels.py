"""The grouped LoRA kernels give vLLM's own CPU kernels' results (rollout/lora_kernels.py):
one adapter for the whole batch, several mixed, and the "no adapter" index -1."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from lorafleet.rollout.lora_kernels import KERNELS, grouped, install, lora_products

SLOTS, RANK, HIDDEN, OUT = 3, 8, 32, 48


def weights(shape: tuple[int, ...]) -> torch.Tensor:
    stacked = torch.randn(SLOTS, 1, *shape)
    stacked[-1] = 0  # vLLM's unused slot
    return stacked


@pytest.mark.parametrize("indices", [[1] * 7, [0, 1, 1, -1, 0, 2, -1], [-1] * 7])
def test_grouped_kernels_equal_vllms(indices):
    torch.manual_seed(0)
    ids = torch.tensor(indices)
    original = {name: getattr(lora_ops, name) for name in KERNELS}
    original = {name: getattr(k, "vllm_original", k) for name, k in original.items()}
    x, a = torch.randn(len(ids), HIDDEN), weights((RANK, HIDDEN))
    h, b = torch.randn(len(ids), RANK), weights((OUT, RANK))
    cases = [
        ("bgmv_shrink", x, a, torch.zeros(len(ids), RANK), (0.5,)),
        ("bgmv_expand", h, b, torch.randn(len(ids), OUT), (True,)),
        ("bgmv_expand", h, b, torch.randn(len(ids), OUT - 4), (False,)),  # padded apart
        ("bgmv_expand_slice", h, b, torch.randn(len(ids), 2 * OUT), (OUT, OUT, True)),
        ("bgmv_expand_slice", h, b, torch.randn(len(ids), 2 * OUT), (0, OUT, False)),
    ]
    for name, inputs, stacked, output, args in cases:
        expected, actual = output.clone(), output.clone()
        original[name](inputs, stacked, expected, ids, *args)
        grouped(original[name])(inputs, stacked, actual, ids, *args)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_products_by_hand_and_install():
    w = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]])  # 2 slots, 2x2
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = lora_products(x, w, torch.tensor([0, 1, 0]), torch.float32)
    assert out.tolist() == [[1.0, 4.0], [4.0, 3.0], [5.0, 12.0]]
    install()
    install()  # twice: still one layer over vLLM's own
    from vllm.lora.punica_wrapper import punica_cpu

    for name in KERNELS:
        assert getattr(lora_ops, name) is getattr(punica_cpu, name)
        assert not hasattr(getattr(lora_ops, name).vllm_original, "vllm_original")
