"""The grouped LoRA kernels give vLLM's own CPU kernels' results (rollout/lora_kernels.py):
one adapter for the whole batch, several mixed, and the "no adapter" index -1; the sampler's
rank count run eagerly counts as by hand (rollout/eager_ranks.py). The checks run
in a Ray worker, where the engines run: vLLM is imported and patched there, not in the test
process."""

from __future__ import annotations

INDICES = ([1] * 7, [0, 1, 1, -1, 0, 2, -1], [-1] * 7)
SLOTS, RANK, HIDDEN, OUT = 3, 8, 32, 48


def compare_with_vllm() -> list[str]:
    """Each kernel's output, grouped vs vLLM's, on random inputs; the cases checked."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from lorafleet.rollout.lora_kernels import KERNELS, grouped

    def weights(shape: tuple[int, ...]) -> torch.Tensor:
        stacked = torch.randn(SLOTS, 1, *shape)
        stacked[-1] = 0  # vLLM's unused slot
        return stacked

    torch.manual_seed(0)
    # vLLM's own, also in a worker that installed the grouped ones already
    original = {name: getattr(getattr(lora_ops, name), "vllm_original", getattr(lora_ops, name))
                for name in KERNELS}
    checked = []
    for indices in INDICES:
        ids = torch.tensor(indices)
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
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5,
                                       msg=f"{name} {indices}")
            checked.append(f"{name} {indices}")
    return checked


def installed_once() -> bool:
    """`install` twice: vLLM's ops module and CPU punica wrapper both hold the grouped
    kernels, one layer over vLLM's own."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from lorafleet.rollout.lora_kernels import KERNELS, install

    install()
    install()
    return all(getattr(lora_ops, name) is getattr(punica_cpu, name)
               and not hasattr(getattr(lora_ops, name).vllm_original, "vllm_original")
               for name in KERNELS)


def eager_ranks_by_hand() -> bool:
    """rollout/eager_ranks.py: after `install`, the sampler counts ranks eagerly (not the
    compiled function, which Dynamo would trace for seconds) and each count is the number of
    vocabulary entries at least as likely as the token's, ties included, counted by hand."""
    import torch
    from vllm.v1.sample import sampler

    from lorafleet.rollout.eager_ranks import install

    compiled = sampler.batched_count_greater_than
    install()
    eager = sampler.batched_count_greater_than
    torch.manual_seed(0)
    logprobs = torch.randn(5, 50).log_softmax(-1)
    values = logprobs.gather(-1, torch.tensor([[0], [3], [7], [49], [11]]))
    logprobs[2, 8] = values[2, 0]  # a tie counts
    by_hand = [sum(float(x) >= float(v) for x in row)
               for row, v in zip(logprobs, values[:, 0], strict=True)]
    return (eager is not compiled and not hasattr(eager, "_torchdynamo_orig_callable")
            and eager(logprobs, values).tolist() == by_hand)


def test_grouped_kernels_equal_vllms_and_install_once(ray_cluster):
    import sys

    from ray import cloudpickle

    # the functions travel by value: this module is not on the workers' path
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    checked = ray_cluster.get(ray_cluster.remote(compare_with_vllm).options(
        num_cpus=0.1).remote())
    assert len(checked) == 15
    assert ray_cluster.get(ray_cluster.remote(installed_once).options(num_cpus=0.1).remote())
    assert ray_cluster.get(ray_cluster.remote(eager_ranks_by_hand).options(
        num_cpus=0.1).remote())


def test_products_by_hand():
    import torch

    from lorafleet.rollout.lora_kernels import lora_products

    w = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]])  # 2 slots, 2x2
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = lora_products(x, w, torch.tensor([0, 1, 0]), torch.float32)
    assert out.tolist() == [[1.0, 4.0], [4.0, 3.0], [5.0, 12.0]]
