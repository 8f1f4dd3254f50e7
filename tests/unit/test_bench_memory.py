"""Every variant of `lorafleet bench memory` runs its real update (on the tiny model here)."""

from __future__ import annotations

import pytest

from lorafleet.cluster.bench_memory import VARIANTS, one_variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_and_reports(variant, tiny_model_path):
    result = one_variant(variant, tiny_model_path, steps=2)
    assert result["variant"] == variant
    assert result["peak_mb"] >= result["baseline_mb"] > 0
    assert result["step_seconds"] > 0
