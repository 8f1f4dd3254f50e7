"""Shared fixtures: the embedded tiny model (built once, cached) and a real local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from lorafleet.common.tasks import AdditionTask
    from lorafleet.common.tiny_model import TinyModelSpec, build_tiny_model

    return str(build_tiny_model(AdditionTask(), TinyModelSpec()))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-CPU local Ray cluster; tests/ is on the workers' path for test-only rewards."""
    import ray

    from lorafleet.cluster.fleet import RUNTIME_ENV

    path = f"{TESTS_DIR}:{os.environ.get('PYTHONPATH', '')}"
    env = {**RUNTIME_ENV["env_vars"], "PYTHONPATH": path}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
