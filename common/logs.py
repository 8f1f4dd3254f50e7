"""How much the libraries under lorafleet (vLLM, Ray, transformers, torch) print.

LORAFLEET_LOG_LEVEL=ERROR (the default) shows only their errors; WARNING (`--verbose`) adds
their warnings, Python warnings and model-loading progress bars; INFO and DEBUG everything
they log. lorafleet's own output (progress bar, summary) and errors, an actor's traceback
included, always show. The libraries read these settings when they are imported, so each
process needs them first: the CLI sets them for itself, the actors get them through Ray's
runtime_env and a rollout worker applies them again before it imports vLLM.
"""

from __future__ import annotations

import logging
import os
import warnings

from .configio import ConfigError

LEVEL_ENV = "LORAFLEET_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level() -> str:
    level = os.environ.get(LEVEL_ENV, "ERROR").upper()
    if level not in LEVELS:
        raise ConfigError(f"{LEVEL_ENV}={level}: expected one of {', '.join(LEVELS)}")
    return level


def quiet() -> bool:
    """ERROR: no library warnings, Python warnings or progress bars."""
    return log_level() == "ERROR"


def library_env() -> dict[str, str]:
    """The libraries' own variables for log_level(); any the environment sets already win."""
    level = log_level()
    env = {
        LEVEL_ENV: level,
        "VLLM_LOGGING_LEVEL": level,
        "TRANSFORMERS_VERBOSITY": level.lower(),
        "TORCH_CPP_LOG_LEVEL": "INFO" if level == "DEBUG" else level,  # e.g. NUMA binding
    }
    if quiet():
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights" too
        env["PYTHONWARNINGS"] = "ignore"  # read at start-up: actors (this process: below)
    return {k: os.environ.get(k, v) for k, v in env.items()}


def apply_log_level(verbose: bool = False) -> None:
    """Set this process up (before the libraries are imported); `verbose`: WARNING."""
    if verbose:
        os.environ[LEVEL_ENV] = "WARNING"
    os.environ.update(library_env())
    # vLLM sets up its logger after some of its modules have logged already (Triton's check)
    logging.getLogger("vllm").setLevel(log_level())
    if quiet():
        warnings.simplefilter("ignore")
