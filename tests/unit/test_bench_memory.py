"""`lorafleet bench memory`: every variant runs its real update (tiny model), each in its own
process as the bench runs it: the measuring code resets the process's peak RSS and thread
count, which this process keeps."""

from __future__ import annotations

import pytest

from lorafleet.cluster.bench.memory import VARIANTS, BenchSetup, run_variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_and_reports(variant, tiny_model_path):
    setup = BenchSetup(steps=2)
    result = run_variant(variant, tiny_model_path, setup)
    assert result["variant"] == variant and not result["oom"]
    assert result["device_name"] == "CPU" and result["peak_mb"] > 0
    assert result["tokens_per_s"] == pytest.approx(setup.tokens / result["step_seconds"])
