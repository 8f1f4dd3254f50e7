"""`lorafleet serve`'s wire formats against the `tinker` SDK's own encoders and decoders, its
learner lanes' order, checkpoint paths and config checks (no server, no Ray)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from lorafleet.cluster.tinker import wire
from lorafleet.cluster.tinker.config import load_serve_config
from lorafleet.cluster.tinker.state import Lane, Lanes, Op, checkpoint_dir
from lorafleet.common.client_records import ForwardBackwardResult
from lorafleet.common.configio import ConfigError
from lorafleet.common.records import Prompt, Rollout


def request_body(data, loss="ppo", config=None, forward_only=False) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss,
                                                          loss_fn_config=config),
        model_id="s:train:0", seq_id=3)
    message = forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    return message.SerializeToString()


def datum(tokens, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def test_forward_backward_request_as_the_sdk_encodes_it():
    data = [datum([5, 6, 7], target_tokens=np.array([6, 7, 2]),
                  logprobs=np.array([0.0, -0.5, -1.0], dtype=np.float32),
                  advantages=np.array([0.0, 1.0, 1.0], dtype=np.float32)),
            datum([9], target_tokens=np.array([2]), logprobs=np.array([-2.0]),
                  advantages=np.array([-1.0]))]
    body = request_body(data, config={"clip_low_threshold": 0.9}, forward_only=True)
    for sent, encoding in ((body, None), (zstandard.ZstdCompressor().compress(body), "zstd")):
        call = wire.forward_backward_call(sent, encoding)
        assert (call.model_id, call.seq_id, call.forward_only) == ("s:train:0", 3, True)
        assert (call.loss.name, call.loss.config) == ("ppo", {"clip_low_threshold": 0.9})
        assert [d.tokens for d in call.datums] == [[5, 6, 7], [9]]
        first = call.datums[0].inputs
        assert first["target_tokens"].dtype == torch.int64
        assert first["target_tokens"].tolist() == [6, 7, 2]
        assert first["logprobs"].tolist() == [0.0, -0.5, -1.0]
        assert call.datums[1].inputs["advantages"].tolist() == [-1.0]


@pytest.mark.parametrize("data, config, named", [
    ([datum([1, 2], target_tokens=np.array([[2, 3], [3, 4]]))], None, "2-D loss input"),
    ([types.Datum(model_input=types.ModelInput(chunks=[types.ImageChunk(
        data=b"x", format="png")]), loss_fn_inputs={"target_tokens": np.array([1])})], None,
     "image model input"),
    ([datum([1], target_tokens=np.array([2]))], {"mode": "x"}, "text loss_fn_config"),
])
def test_what_the_server_does_not_do_is_named(data, config, named):
    with pytest.raises(wire.Unsupported, match=named):
        wire.forward_backward_call(request_body(data, "cross_entropy", config), None)


def test_a_body_that_is_not_the_proto_is_a_bad_request():
    with pytest.raises(wire.BadRequest, match="not a tinker ForwardBackwardRequest"):
        wire.forward_backward_call(b"\xff\xff\xff", None)


def test_results_decode_with_the_sdk():
    rows = [torch.tensor([-0.5, -1.5]), torch.tensor([-2.0])]
    out = deserialize_forward_backward_output(wire.forward_backward_output(
        ForwardBackwardResult(rows, {"loss:sum": 4.0})))
    assert out.metrics == {"loss:sum": 4.0}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5, -1.5], [-2.0]]
    prompt = Prompt(0, "", [1, 2, 3, 4], {})
    rollouts = [Rollout(prompt, k, ids, "", lps, reason, 0, 0, prompt_logprobs=[
        math.nan, -1.0, -2.0, -3.0]) for k, (ids, lps, reason) in enumerate(
        [([7, 2], [-0.1, -0.2], "stop"), ([8, 9, 9], [-1.0, -2.0, -3.0], "length")])]
    response = deserialize_sample_response(wire.sample_response(rollouts, True, last_n=2))
    assert [s.tokens for s in response.sequences] == [[7, 2], [8, 9, 9]]
    assert response.sequences[1].logprobs == pytest.approx([-1.0, -2.0, -3.0])
    assert [s.stop_reason for s in response.sequences] == ["stop", "length"]
    assert response.prompt_logprobs[:2] == [None, None]
    assert response.prompt_logprobs[2:] == [-2.0, -3.0]
    assert deserialize_sample_response(wire.sample_response(rollouts, False)) \
        .prompt_logprobs is None


def test_sampling_params_adam_params_and_sample_fields():
    choice = wire.sampling_choice({"max_tokens": 5, "stop": ["\n", "Q:"], "seed": 3})
    assert (choice.stop, choice.stop_token_ids, choice.seed) == (("\n", "Q:"), (), 3)
    assert wire.sampling_choice({"stop": [2, 7]}).stop_token_ids == (2, 7)
    assert wire.sampling_choice({"stop": "END"}).stop == ("END",)
    step = wire.adam_step({"adam_params": {"learning_rate": 0.01, "beta2": 0.99}})
    assert (step.learning_rate, step.beta2, step.eps) == (0.01, 0.99, 1e-12)
    with pytest.raises(wire.Unsupported, match="'dimuon'"):
        wire.adam_step({"optimizer_params": {"type": "dimuon", "learning_rate": 0.1}})
    with pytest.raises(wire.Unsupported, match="topk_sample_logprobs"):
        wire.check_sample_request({"topk_sample_logprobs": 5})
    wire.check_sample_request({"topk_sample_logprobs": 0, "record_stability_info": False})


def test_lanes_run_each_model_in_seq_order_and_take_turns():
    async def run() -> list[list[str]]:
        lanes, cycles = Lanes(), []
        for key, seq in (("a", 2), ("a", 1), ("a", 3), ("b", 1)):
            lanes.add(key, Op(f"{key}{seq}", lambda: None), seq)
        lanes.add(Lanes.ADMIN, Op("create", lambda: None))
        while ops := lanes.next_cycle():
            cycles.append([op.request_id for op in ops])
        return cycles

    # one request of each lane per cycle, each lane's in seq_id order
    assert asyncio.run(run()) == [["create", "a1", "b1"], ["a2"], ["a3"]]
    lane = Lane()
    lane.add(Op("x", lambda: None), 1)
    with pytest.raises(wire.BadRequest, match="seq_id 1 was already used"):
        lane.add(Op("y", lambda: None), 1)
    gap = Lane()
    gap.add(Op("late", lambda: None), 2)  # seq 1 never comes
    assert gap.ready() is None and gap.stalled(timeout_s=3600) == []
    assert [op.request_id for op in gap.stalled(timeout_s=-1)] == ["late"]


def test_checkpoint_paths(tmp_path):
    model, kind, directory = checkpoint_dir(tmp_path, "tinker://s:train:0/weights/step-3",
                                            ("weights",))
    assert (model, kind, directory) == ("s:train:0", "weights",
                                        tmp_path / "s_train_0" / "weights" / "step-3")
    for bad in ("s:train:0/weights/x", "tinker://s/weights/../x", "tinker://s/other/x",
                "tinker://../weights/x", "tinker://s/weights/.."):
        with pytest.raises(wire.BadRequest, match="tinker://"):
            checkpoint_dir(tmp_path, bad, ("weights",))


def test_serve_config_refuses_run_keys_it_has_no_use_for():
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt: a server's clients"):
        load_serve_config(None, ["rollout.samples_per_prompt=8"])
    with pytest.raises(ConfigError, match="serve.max_lora_rank"):
        load_serve_config(None, ["serve.max_lora_rank=12"])
    assert load_serve_config("deploy/configs/serve.yaml").serve.host == "127.0.0.1"
