"""Resource keys of the run config: the checks on bad input, what each node layout cannot hold
(named by key), the device and dtype an actor picks, and vLLM's GPU-only arguments."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorafleet.cluster.actor_group import shortfalls
from lorafleet.cluster.config import load_train_config
from lorafleet.cluster.specs import group_specs, sync_tolerance
from lorafleet.common.configio import ConfigError
from lorafleet.common.devices import pick_device
from lorafleet.common.specs import EngineSpec
from lorafleet.rollout.worker import engine_args

GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


@pytest.mark.parametrize(("overrides", "key"), [
    (["learner.num_gpus=1.5"], "learner.num_gpus"),
    (["learner.num_gpus=2"], "learner.num_gpus"),
    (["reward.num_gpus_per_actor=-1"], "reward.num_gpus_per_actor"),
    (["rollout.num_gpus_per_worker=1", "rollout.tensor_parallel_size=2"],
     "rollout.tensor_parallel_size=2 needs rollout.num_gpus_per_worker"),
    (["rollout.num_gpus_per_worker=1", "rollout.gpu_memory_utilization=1.2"],
     "rollout.gpu_memory_utilization must be in"),
    (["rollout.num_gpus_per_worker=1", "rollout.gpu_memory_utilization=0"],
     "rollout.gpu_memory_utilization must be in"),
    (["rollout.gpu_memory_utilization=0.5"], "rollout.num_gpus_per_worker is 0"),
    (["placement.strategy=STRICT_SPREAD"], "placement.strategy"),
    (["algo.max_tokens_per_microbatch=0"], "algo.max_tokens_per_microbatch"),
])
def test_bad_resource_keys_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(None, overrides)


def test_the_default_job_asks_for_cpus_only_and_fits_two_cores():
    specs = group_specs(load_train_config(None, ["placement.colocate=off"]))
    assert [s.resources.bundle() for s in specs] == [{"CPU": 0.8}, {"CPU": 0.5}, {"CPU": 0.1}]
    assert shortfalls(specs, [{"CPU": 2.0}], "PACK") == []
    specs = group_specs(load_train_config(None, ["placement.colocate=on"]))
    assert [s.resources.bundle() for s in specs] == [{"CPU": 1.3}, {"CPU": 0.5}, {"CPU": 0.1}]
    assert shortfalls(specs, [{"CPU": 2.0}], "PACK") == []


def test_shortfalls_name_the_resource_and_the_keys():
    specs = group_specs(load_train_config(None, [
        "learner.num_gpus=1", "rollout.num_gpus_per_worker=1",
        "rollout.tensor_parallel_size=1", "rollout.resources_per_worker={a100: 1}",
    ]))
    # GPU keys on a CPU-only cluster
    [gpus, a100] = shortfalls(specs, [{"CPU": 16.0}], "PACK")[:2]
    assert gpus == ("3 GPU asked in total (learner.num_gpus=1, rollout.num_gpus_per_worker=1 x "
                    "2 actors) but the cluster has 0")
    assert a100.startswith("2 a100 asked in total (rollout.resources_per_worker.a100=1 x 2")
    # enough GPUs in total, but a worker's 2 GPUs (tensor parallel) on no single node
    specs = group_specs(load_train_config(None, [
        "rollout.num_gpus_per_worker=2", "rollout.tensor_parallel_size=2",
        "rollout.num_workers=1"]))
    [problem] = shortfalls(specs, [GPU_NODE, GPU_NODE, {"CPU": 2.0}], "PACK")
    assert problem.startswith(
        "no node can hold one rollout actor's bundle {'CPU': 0.5, 'GPU': 2.0}")
    assert "rollout.num_gpus_per_worker" in problem
    # STRICT_PACK: everything on one node
    specs = group_specs(load_train_config(None, ["learner.num_gpus=1"]))
    assert shortfalls(specs, [GPU_NODE, {"CPU": 8.0}], "PACK") == []
    [problem] = shortfalls(specs, [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}], "STRICT_PACK")
    assert problem.startswith("placement.strategy=STRICT_PACK puts every actor on one node")


def test_device_and_dtype_follow_the_gpus_ray_assigned():
    assert pick_device([], None, cuda_available=False) == ("cpu", "float32")
    assert pick_device([], "bfloat16", cuda_available=False) == ("cpu", "bfloat16")
    assert pick_device(["3"], None, cuda_available=True) == ("cuda", "bfloat16")
    assert pick_device(["3"], "float32", cuda_available=True) == ("cuda", "float32")
    with pytest.raises(RuntimeError, match=r"GPUs \['3'\] but torch sees no CUDA"):
        pick_device(["3"], None, cuda_available=False)


def test_sync_tolerance_follows_the_dtypes_the_actors_pick():
    assert sync_tolerance(load_train_config(None)) == 1e-3  # float32 on CPU: the default job
    assert sync_tolerance(load_train_config(None, ["learner.num_gpus=1"])) == 5e-2
    assert sync_tolerance(load_train_config(None, ["model.dtype=float32",
                                                   "learner.num_gpus=1"])) == 1e-3


def test_vllm_gets_gpu_arguments_only_on_a_gpu():
    spec = EngineSpec("m", max_model_len=128, max_lora_rank=8, seed=0)
    cpu = engine_args(spec, "bfloat16", gpu=False)
    assert "tensor_parallel_size" not in cpu and "gpu_memory_utilization" not in cpu
    sharded = replace(spec, tensor_parallel_size=2, gpu_memory_utilization=0.6)
    gpu = engine_args(sharded, "bfloat16", gpu=True)
    assert gpu == {**cpu, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.6,
                   "distributed_executor_backend": "mp"}
    # one GPU, vLLM's default memory share
    assert engine_args(spec, "bfloat16", gpu=True) == cpu
    with pytest.raises(ValueError, match="need a GPU worker"):
        engine_args(replace(spec, tensor_parallel_size=2), "bfloat16", gpu=False)
    # colocated with the learner: on a GPU the engine can free its KV cache during updates
    # (vLLM's sleep mode; cluster/colocated.py), on the CPU there is nothing to free
    colocated = replace(spec, colocated=True)
    assert engine_args(colocated, "bfloat16", gpu=True) == {**cpu, "enable_sleep_mode": True}
    assert engine_args(colocated, "bfloat16", gpu=False) == cpu
