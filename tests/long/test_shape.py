"""A job on a random-init model of Qwen2.5-0.5B's shape through the real fleet, next to the
embedded model (`lorafleet bench shape`, smaller): it runs, the probe check holds at that size
(the run itself stops on a gap over the tolerance) and the figures are those of the shapes.
About 10 minutes on 2 cores; ~9 GiB of memory (float32 0.5B in the learner and a worker)."""

from __future__ import annotations

from lorafleet.cluster.bench.shape import bench_shape
from lorafleet.common.config import LoRAConfig

SHAPE = "qwen2.5-0.5b"
# (in, out) features of each LoRA target of one decoder layer: Qwen2.5-0.5B (hidden 896,
# 2 KV heads of 64, intermediate 4864) and the embedded model (hidden 128, intermediate 384)
LAYER_SHAPES = {
    SHAPE: ([(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864),
             (4864, 896)], 24),
    "tiny": ([(128, 128)] * 4 + [(128, 384), (128, 384), (384, 128)], 4),
}


def lora_bytes(model: str, rank: int) -> int:
    """float32 A [rank, in] and B [out, rank] of every target of every layer."""
    shapes, layers = LAYER_SHAPES[model]
    return 4 * rank * layers * sum(i + o for i, o in shapes)


def test_a_real_shape_runs_through_the_fleet(tmp_path):
    iterations = 2
    figures = bench_shape(None, [f"iterations={iterations}", "prompts_per_iteration=4",
                                 "rollout.num_workers=1", "reward.num_actors=1"],
                          SHAPE, str(tmp_path), "test")
    rank = LoRAConfig().rank
    for model, f in figures.items():
        assert f["iterations"] == iterations
        assert f["adapter_bytes"] == lora_bytes(model, rank)
        assert 0 <= f["probe_gap"] <= f["probe_tolerance"]
        assert f["sync_seconds"] > 0 and f["verified_sync_seconds"] >= f["sync_seconds"] / 10
        assert f["update_seconds"] > 0
    shaped, tiny = figures[SHAPE], figures["tiny"]
    assert 490e6 < shaped["parameters"] < 500e6  # 494M with the tied embedding once
    weights_mib = shaped["parameters"] * 4 / 2**20  # float32
    # the learner and the worker each hold the float32 weights; the reward actor no model
    for actor in ("learner 0", "rollout 0"):
        assert weights_mib < shaped["peak_rss_mib"][actor] < 4 * weights_mib + 4096, shaped
        assert shaped["peak_rss_mib"][actor] > tiny["peak_rss_mib"][actor] + weights_mib / 2
    assert shaped["peak_rss_mib"]["reward 0"] < weights_mib
    assert (tmp_path / "shape.md").read_text().count("\n| ") >= 10
