"""Nested state (optimizer state dicts, RNG states, counters) to safetensors + JSON and back:
tensors go to the safetensors file, everything else to JSON; no pickle, so a checkpoint from
someone else cannot run code when it is loaded."""

from __future__ import annotations

import json
from pathlib import Path

TENSOR, DICT = "__tensor__", "__dict__"


def flatten(value, tensors: dict, path: str = "s"):
    """JSON-able structure with tensors replaced by {TENSOR: key}; dict keys keep their type
    (optimizer states are keyed by int)."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        return {DICT: [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {path}")


def unflatten(value, tensors: dict):
    if isinstance(value, dict) and TENSOR in value:
        return tensors[value[TENSOR]]
    if isinstance(value, dict) and DICT in value:
        return {k: unflatten(v, tensors) for k, v in value[DICT]}
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    return value


def save_state(state: dict, directory: Path, name: str) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = flatten(state, tensors)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: Path, name: str) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(directory / f"{name}.safetensors")
    return unflatten(json.loads((directory / f"{name}.json").read_text()), tensors)
