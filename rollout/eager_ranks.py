"""The sampled token's rank, counted eagerly on CPU.

vLLM's sampler counts, for every returned log-prob, how many vocabulary entries score at least
as high (`batched_count_greater_than`, under `torch.compile` so that a GPU does not copy the
logits). Dynamo traces it on the first generate call of every engine: 2.7 s of each engine's
start on 2 cores (a profile of the default job's first sync), compiled again in each new
process. On CPU the same function runs eagerly, with the same results; `install` puts it where
the sampler looks it up; tests/ray/test_lora_kernels.py checks its counts by hand."""

from __future__ import annotations


def install() -> None:
    """The sampler's rank count replaced by the function it compiles, run as it is."""
    from vllm.v1.sample import sampler

    compiled = sampler.batched_count_greater_than
    sampler.batched_count_greater_than = getattr(compiled, "_torchdynamo_orig_callable",
                                                 compiled)
