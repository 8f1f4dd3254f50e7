"""`lorafleet bench memory`: every variant runs its real update (tiny model). The measuring code
resets the process's peak RSS and thread count, so it runs outside this process: all variants
in one child process (the bench itself gives each its own, for its own peak; the e2e tier's
test_memory_ordering runs it that way), since each child pays ~10 s of imports."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from lorafleet.cluster.bench.memory import VARIANTS, BenchSetup

SETUP = BenchSetup(steps=2)
CHILD = """
import json, sys
from lorafleet.cluster.bench.memory import VARIANTS, BenchSetup, one_variant
setup = BenchSetup(**json.loads(sys.argv[2]))
print(json.dumps({variant: one_variant(variant, sys.argv[1], setup) for variant in VARIANTS}))
"""


@pytest.fixture(scope="module")
def results(tiny_model_path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, tiny_model_path,
                          json.dumps(asdict(SETUP))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_and_reports(variant, results):
    result = results[variant]
    assert result["variant"] == variant and not result["oom"]
    assert result["device_name"] == "CPU" and result["peak_mb"] > 0
    assert result["tokens_per_s"] == pytest.approx(SETUP.tokens / result["step_seconds"])
