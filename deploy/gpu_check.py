"""The learner's GPU options on one real GPU, without Ray or vLLM: the device/dtype pick, the
learner on cuda in bfloat16 with sdpa, gradient checkpointing and micro-batches, the published
snapshot on CPU, micro-batch gradient equality on cuda (float32), peak memory with and
without checkpointing. Run from the repository root on a GPU machine with torch, transformers
and peft: `python deploy/gpu_check.py` (the figures in the README's GPU section)."""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    sys.modules["ray"] = None  # the learner path needs no Ray
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # helpers.contrast_batch
    import torch
    from transformers import AutoTokenizer

    from helpers import contrast_batch
    from lorafleet.common.devices import pick_device
    from lorafleet.common.specs import LearnerSpec, PolicySpec
    from lorafleet.common.tasks.addition import AdditionTask
    from lorafleet.common.tiny_model import TinyModelSpec, build_tiny_model
    from lorafleet.learner.actor import Learner, train_one
    from lorafleet.learner.algorithms.registry import algorithm

    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    out["pick_device"] = pick_device(["0"], None, torch.cuda.is_available())
    path = str(build_tiny_model(AdditionTask(), TinyModelSpec()))
    tok = AutoTokenizer.from_pretrained(path)

    def make(name, dtype, **keys):
        ckpt = keys.pop("gradient_checkpointing", False)
        algo = algorithm(name).config(**{"epochs": 1, "minibatch_size": 64, **keys})
        return Learner(LearnerSpec(path, tok.pad_token_id, (PolicySpec(algo=algo),),
                                   dtype=dtype, threads=2, device="cuda",
                                   attn_implementation="sdpa", gradient_checkpointing=ckpt))

    def sgd_step(learner, batch):
        learner.core.policy_opt = torch.optim.SGD(learner.core.policy_params, lr=1.0)
        train_one(learner, batch)
        return [p.detach().clone() for p in learner.core.policy_params]

    for name in ("ppo", "spr"):
        a = sgd_step(make(name, "float32"), contrast_batch(tok, 0))
        b = sgd_step(make(name, "float32", max_tokens_per_microbatch=1), contrast_batch(tok, 0))
        gap = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
        out[f"{name}_micro_gap_f32_cuda"] = gap

    for ckpt in (False, True):
        torch.cuda.reset_peak_memory_stats()
        learner = make("grpo", None, gradient_checkpointing=ckpt, max_tokens_per_microbatch=512)
        start = time.perf_counter()
        stats = train_one(learner, contrast_batch(tok, learner.version))
        torch.cuda.synchronize()
        snap = learner.publish()
        out[f"grpo_bf16_ckpt={ckpt}"] = {
            "dtype": str(learner.net.dtype),
            "param_device": str(learner.core.policy_params[0].device),
            "snapshot_devices": sorted({str(t.device) for t in snap.tensors.values()}),
            "policy_loss": stats.policy_loss, "grad_norm": stats.grad_norm,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "train_s": time.perf_counter() - start}
        del learner
        torch.cuda.empty_cache()
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
