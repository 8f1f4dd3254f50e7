"""The Tinker SDK's wire formats and lorafleet's records: the protobuf forward_backward request
(the SDK's own `tinker.proto` schema, optionally zstd-compressed) into TokenDatums, and the
protobuf results it insists on (ForwardBackwardOutput, SampleResponse); the JSON requests'
parts (a prompt, sampling params, AdamParams). Anything the SDK can send that lorafleet does
not do is an Unsupported error naming the feature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...common.client_records import AdamStep, ClientLoss, ForwardBackwardResult, TokenDatum
from ...common.records import Rollout


class Unsupported(ValueError):
    """Something the Tinker API has that this server does not do; the message names it."""


class BadRequest(ValueError):
    """A request that cannot be served as sent; the message says what is wrong."""


def _pb():
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss: ClientLoss
    forward_only: bool
    datums: list[TokenDatum]


def decompress(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding != "zstd":
        raise Unsupported(f"Content-Encoding {encoding!r} (zstd or none)")
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(body)


def chunk_tokens(kind: str, tokens: list[int]) -> list[int]:
    if kind != "encoded_text":
        raise Unsupported(f"{kind} model input chunks (this server takes token chunks only)")
    return tokens


def _tensor(message, name: str):
    """A proto Tensor as a 1-D torch tensor (int64 or float32)."""
    import torch

    pb = _pb()
    dtypes = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64}
    if message.dtype not in dtypes:
        raise Unsupported(f"loss input {name!r} of proto dtype {message.dtype}")
    dtype = dtypes[message.dtype]
    shape = list(message.shape)
    if len(shape) > 1:
        raise Unsupported(f"{len(shape)}-D loss input {name!r} (shape {shape}; top-k "
                          "targets): loss inputs are 1-D, one value per position")
    if message.WhichOneof("encoding") == "sparse_csr":
        raise Unsupported(f"sparse loss input {name!r}")
    return torch.from_numpy(np.frombuffer(message.dense, dtype=dtype).copy())


def loss_config(message) -> dict[str, float]:
    """loss_fn_config_v2 (numbers only), else the legacy float map."""
    if message.loss_fn_config_v2:
        config = {}
        for key, value in message.loss_fn_config_v2.items():
            if value.WhichOneof("value") != "number":
                raise Unsupported(f"text loss_fn_config value {key!r}")
            config[key] = value.number
        return config
    return dict(message.loss_fn_config)


def forward_backward_call(body: bytes, encoding: str | None) -> ForwardBackwardCall:
    message = _pb().ForwardBackwardRequest()
    try:
        message.ParseFromString(decompress(body, encoding))
    except Exception as exc:  # a body that is not the SDK's proto
        raise BadRequest(f"forward_backward body is not a tinker ForwardBackwardRequest "
                         f"protobuf ({type(exc).__name__}: {exc})") from exc
    datums = []
    for datum in message.data:
        tokens = [t for chunk in datum.model_input
                  for t in chunk_tokens(chunk.WhichOneof("chunk"), np.frombuffer(
                      chunk.encoded_text.tokens, dtype=np.int32).tolist())]
        inputs = {name: _tensor(t, name) for name, t in datum.loss_fn_inputs.items()}
        datums.append(TokenDatum(tokens, inputs))
    return ForwardBackwardCall(
        message.model_id, message.seq_id, ClientLoss(message.loss_fn, loss_config(message)),
        message.forward_only, datums)


def _batched(values: list) -> Any:
    """Per-datum float32 rows as one proto BatchedTensor (byte offsets between the rows)."""
    pb = _pb()
    rows = [np.asarray(v, dtype=np.float32) for v in values]
    offsets = np.cumsum([0] + [row.nbytes for row in rows], dtype=np.int64)
    return pb.BatchedTensor(data=b"".join(row.tobytes() for row in rows),
                            offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32)


def forward_backward_output(result: ForwardBackwardResult) -> bytes:
    pb = _pb()
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord",
                                       metrics=result.metrics)
    record = message.loss_fn_outputs.add(num_datums=len(result.logprobs))
    record.fields["logprobs"].CopyFrom(_batched([t.numpy() for t in result.logprobs]))
    return message.SerializeToString()


def prompt_tokens(prompt: dict) -> list[int]:
    """A JSON ModelInput's tokens."""
    return [t for chunk in prompt.get("chunks", [])
            for t in chunk_tokens(chunk.get("type", "encoded_text"), chunk["tokens"])]


# the SampleRequest fields this server does not honour, with the value that means "not asked"
UNSUPPORTED_SAMPLE_FIELDS = {
    "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0, "target_prompt_logprobs": None,
    "prompt_alt_tokens_k": 0, "record_stability_info": None,
}


def check_sample_request(request: dict) -> None:
    for name, unset in UNSUPPORTED_SAMPLE_FIELDS.items():
        if request.get(name, unset) not in (unset, False):
            raise Unsupported(f"sample's {name}")


@dataclass(frozen=True)
class SamplingChoice:
    """A SamplingParams as a GenerationRequest takes it."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]


def sampling_choice(params: dict) -> SamplingChoice:
    stop = params.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    strings = tuple(s for s in stop if isinstance(s, str))
    ids = tuple(s for s in stop if not isinstance(s, str))
    return SamplingChoice(params.get("max_tokens"), float(params.get("temperature", 1.0)),
                          float(params.get("top_p", 1.0)), int(params.get("top_k", -1)),
                          params.get("seed"), strings, tuple(int(i) for i in ids))


def sample_response(rollouts: list[Rollout], prompt_logprobs: bool,
                    last_n: int | None = None) -> bytes:
    """The samples of one prompt; with its prompt log-probs (NaN where not scored: the first
    token, and those before the last `last_n`)."""
    pb = _pb()
    message = pb.SampleResponse()
    for rollout in rollouts:
        if rollout.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"the engine ended a sample with {rollout.finish_reason!r}")
        message.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if rollout.finish_reason == "stop"
            else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(rollout.response_ids, dtype=np.int32).tobytes(),
            logprobs=np.asarray(rollout.logprobs, dtype=np.float32).tobytes())
    if prompt_logprobs:
        values = list(rollouts[0].prompt_logprobs)
        if last_n is not None:
            values[: len(values) - last_n] = [math.nan] * (len(values) - last_n)
        message.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return message.SerializeToString()


def adam_step(request: dict) -> AdamStep:
    params = request.get("adam_params")
    if params is None:
        other = request.get("optimizer_params") or {}
        raise Unsupported(f"optimizer {other.get('type', '?')!r} (AdamW only)")
    fields = set(AdamStep.__dataclass_fields__)
    unknown = sorted(set(params) - fields - {"type"})
    if unknown:
        raise Unsupported(f"AdamParams fields {unknown}")
    return AdamStep(**{k: float(v) for k, v in params.items() if k in fields})
