"""LORAFLEET_LOG_LEVEL: what the libraries are told, and that the environment wins."""

from __future__ import annotations

import pytest

from lorafleet.common.configio import ConfigError
from lorafleet.common.logs import LEVEL_ENV, library_env


@pytest.fixture
def clean_env(monkeypatch):
    for key in (LEVEL_ENV, "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL",
                "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_quiet_by_default_and_warnings_back_at_warning(clean_env):
    env = library_env()
    assert env[LEVEL_ENV] == env["VLLM_LOGGING_LEVEL"] == env["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["PYTHONWARNINGS"] == "ignore"
    clean_env.setenv(LEVEL_ENV, "warning")
    env = library_env()
    assert env["VLLM_LOGGING_LEVEL"] == "WARNING" and env["TRANSFORMERS_VERBOSITY"] == "warning"
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in env and "PYTHONWARNINGS" not in env


def test_the_environment_wins_and_a_bad_level_is_named(clean_env):
    clean_env.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert library_env()["VLLM_LOGGING_LEVEL"] == "DEBUG"
    clean_env.setenv(LEVEL_ENV, "LOUD")
    with pytest.raises(ConfigError, match="LORAFLEET_LOG_LEVEL=LOUD: expected one of DEBUG"):
        library_env()
