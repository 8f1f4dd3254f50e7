"""The `policies:` section (cluster/policies.py): each policy's own config, the one-line errors
of a bad entry, and the sweep shorthand."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafleet.cluster.config import TrainConfig, load_train_config
from lorafleet.cluster.policies import expand_policies, is_per_policy, sweep_policies
from lorafleet.common.configio import ConfigError, save_config
from lorafleet.learner.algorithms.registry import GRPOConfig, PPOConfig

HUB_MODEL = ["model.name_or_path=Qwen/Qwen2.5-0.5B"]  # a base model not built from the task


def policies_of(*entries: str, overrides: tuple[str, ...] = ()) -> list[tuple[str, TrainConfig]]:
    cfg = load_train_config(None, [*overrides, f"policies=[{', '.join(entries)}]"])
    return expand_policies(cfg)


def test_without_policies_the_run_is_one_policy():
    assert expand_policies(TrainConfig()) == []


def test_each_policy_is_the_top_level_with_its_overrides(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": "runs/two", "iterations": 3, "algo": {"kl_coef": 0.05},
        "policies": [
            {"name": "x", "seed": 1},
            {"name": "b", "algo": {"policy_lr": 3e-4}, "reward.fns": ["exact_match"],
             "rollout": {"temperature": 0.7}},
            {"name": "z"},
        ],
    }))
    cfg = load_train_config(path)
    (a_name, a), (b_name, b), (c_name, c) = expand_policies(cfg)
    assert [a_name, b_name, c_name] == ["x", "b", "z"]
    assert [p.run_dir for p in (a, b, c)] == ["runs/two/x", "runs/two/b", "runs/two/z"]
    assert all(p.policies == [] and p.iterations == 3 for p in (a, b, c))
    assert (a.seed, b.seed) == (1, 0)
    assert (b.algo.policy_lr, b.algo.kl_coef, b.reward.fns, b.rollout.temperature) == (
        3e-4, 0.05, ["exact_match"], 0.7)
    # one policy's overrides reach neither the top level nor the others
    assert c == TrainConfig(**{**vars(cfg), "run_dir": "runs/two/z", "policies": []})
    assert cfg.reward.fns == [] and cfg.algo.policy_lr == PPOConfig().policy_lr


def test_a_policy_config_saves_and_loads_back(tmp_path: Path):
    cfg = load_train_config(None, ["policies=[{name: x, lora.rank: 16}]"])
    save_config(cfg, tmp_path / "run.yaml")
    assert load_train_config(tmp_path / "run.yaml") == cfg
    [(_, policy)] = expand_policies(cfg)
    save_config(policy, tmp_path / "a.yaml")
    assert load_train_config(tmp_path / "a.yaml") == policy


def test_per_policy_rollout_settings_are_checked_as_that_policys():
    [(_, sync), (_, async_)] = policies_of(
        "{name: s, rollout.samples_per_prompt: 8}",
        "{name: x, rollout: {mode: async, max_staleness: 2}}")
    assert (sync.rollout.mode, sync.rollout.samples_per_prompt) == ("sync", 8)
    assert (async_.rollout.mode, async_.rollout.max_staleness) == ("async", 2)
    with pytest.raises(ConfigError, match=r"^policies\[x\]: rollout\.max_staleness is read only "
                                          r"with rollout\.mode=async"):
        policies_of("{name: x, rollout.max_staleness: 2}")


def test_another_algorithm_keeps_the_top_levels_keys_it_reads():
    [(_, grpo)] = policies_of("{name: g, algo.name: grpo}",
                              overrides=("algo.kl_coef=0.05", "algo.value_lr=0.01"))
    assert type(grpo.algo) is GRPOConfig
    assert grpo.algo.kl_coef == 0.05  # set at the top level, read by grpo
    assert grpo.algo.policy_lr == GRPOConfig().policy_lr
    with pytest.raises(ConfigError, match=r"^policies\[g\]: algo\.name: expected one of .*"
                                          r"got 'dpo'$"):
        policies_of("{name: g, algo.name: dpo}")


def test_another_task_on_a_hub_model_takes_its_own_reward():
    [(_, cola), (_, addition)] = policies_of(
        "{name: cola, task.name: cola}", "{name: add, task: {name: addition}}",
        overrides=(*HUB_MODEL, "task.name=sst2", "task.max_eval_rows=100"))
    assert (cola.task.reward_fn, cola.task.max_eval_rows) == ("label_match", 100)
    assert addition.task.reward_fn == "exact_match"
    with pytest.raises(ConfigError, match=r"^policies\[add\]: task\.shots=2: task 'addition' "
                                          "takes no in-context examples"):
        policies_of("{name: add, task.name: addition}",
                    overrides=(*HUB_MODEL, "task.name=sst2", "task.shots=2"))


def test_on_the_embedded_model_the_task_is_shared_but_its_reward():
    [(_, own)] = policies_of("{name: x, task.reward_fn: vader_compound}")
    assert own.task.reward_fn == "vader_compound"
    for entry, key in (("{name: x, task.seed: 7}", "seed"),
                       ("{name: x, task.name: sst2}", "name"),
                       ("{name: x, task: {demo_error_rate: 0.1}}", "demo_error_rate")):
        with pytest.raises(ConfigError, match=rf"^policies\[x\]: task\.{key}: with "
                                              r"model\.name_or_path=tiny the base model is "
                                              "built from the task"):
            policies_of(entry)
    [(_, hub)] = policies_of("{name: x, task.seed: 7}", overrides=tuple(HUB_MODEL))
    assert hub.task.seed == 7


@pytest.mark.parametrize(("entries", "overrides", "message"), [
    (["{name: x}", "{name: x, seed: 1}"], [], r"policies\[x\]: two policies are named 'x'"),
    (["{name: x}", "{seed: 1}"], [], r"policies\[1\]: name is missing"),
    (["{name: a.b}"], [], r"policies\[0\]: name 'a\.b' must be letters, digits and _=\+-"),
    (["{name: -a}"], [], r"policies\[0\]: name '-a' must be"),
    (["{name: ''}"], [], r"policies\[0\]: name '' must be"),
    (["{name: 3}"], [], r"policies\[0\]: name 3 must be"),
    ([f"{{name: {'a' * 65}}}"], [], rf"policies\[0\]: name '{'a' * 65}' must be .* at most 64"),
    (["{name: b, model.max_model_len: 64}"], [],
     r"policies\[b\]: model\.max_model_len is shared by every policy \(one base model, one "
     r"fleet\); set it at the top level"),
    (["{name: b, model: {tiny: {hidden_size: 64}}}"], [],
     r"policies\[b\]: model\.tiny\.hidden_size is shared by every policy"),
    (["{name: b, rollout.num_workers: 1}"], [], r"policies\[b\]: rollout\.num_workers is shared"),
    (["{name: b, iterations: 5}"], [], r"policies\[b\]: iterations is shared"),
    (["{name: b, run_dir: x}"], [], r"policies\[b\]: run_dir is shared"),
    (["{name: b, algo.policy_lr: fast}"], [],
     r"policies\[b\]: algo\.policy_lr: expected float, got 'fast'"),
    (["{name: b, lora.rank: 12}"], [], r"policies\[b\]: lora\.rank: vLLM supports"),
    (["{name: b, rollout: {temprature: 0.5}}"], [],
     r"policies\[b\]: unknown key\(s\) 'rollout\.temprature'; allowed keys in rollout: "),
    (["{name: b, seed.x: 1}"], [], r"policies\[b\]: seed\.x: seed is 0, not a section"),
    (["3"], [], r"policies\[0\]: expected dict\[str, Any\], got 3"),
    (["{name: x}", "{name: b}", "{name: z}"], ["rollout.max_loras=2"],
     r"policies: 3 policies, but each rollout engine serves rollout\.max_loras=2 adapters"),
    (["{name: x}"], ["stages=[sft, rl]"],
     r"policies: several policies train only in the rl stage; this run has stages "
     r"\['sft', 'rl'\]"),
])
def test_a_bad_entry_is_one_line_naming_the_policy_and_the_key(entries, overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}") as error:
        load_train_config(None, [*overrides, f"policies=[{', '.join(entries)}]"])
    assert "\n" not in str(error.value)


def test_per_policy_keys():
    assert is_per_policy("seed") and is_per_policy("algo.kl_coef") and is_per_policy("task")
    assert is_per_policy("task.data.train.path") and is_per_policy("reward.fns")
    assert not is_per_policy("seeds") and not is_per_policy("reward.num_actors")
    assert not is_per_policy("rollout") and not is_per_policy("model.name_or_path")


def test_rollout_max_loras_is_at_least_one():
    with pytest.raises(ConfigError, match=r"^rollout\.max_loras must be >= 1, got 0$"):
        load_train_config(None, ["rollout.max_loras=0"])


def test_sweep_is_the_product_of_the_listed_values():
    policies, overrides = sweep_policies(
        ["algo.policy_lr=1e-4,3e-4", "iterations=5", "seed=0,1", "reward.fns=[a, b]",
         "rollout.stop={x: 1}"])
    assert overrides == ["iterations=5", "reward.fns=[a, b]", "rollout.stop={x: 1}"]
    assert policies == [
        {"algo.policy_lr": "1e-4", "seed": 0, "name": "policy_lr=1e-4_seed=0"},
        {"algo.policy_lr": "1e-4", "seed": 1, "name": "policy_lr=1e-4_seed=1"},
        {"algo.policy_lr": "3e-4", "seed": 0, "name": "policy_lr=3e-4_seed=0"},
        {"algo.policy_lr": "3e-4", "seed": 1, "name": "policy_lr=3e-4_seed=1"},
    ]
    assert sweep_policies(["seed=3"]) == ([], ["seed=3"])


def test_swept_policies_load_with_names_made_valid():
    policies, overrides = sweep_policies(["rollout.temperature=0.5,1.0", "task.reward_fn=a/b,c"])
    assert [p["name"] for p in policies] == [
        "temperature=0-5_reward_fn=a-b", "temperature=0-5_reward_fn=c",
        "temperature=1-0_reward_fn=a-b", "temperature=1-0_reward_fn=c"]
    cfg = load_train_config(None, overrides + ["rollout.max_loras=4"])
    cfg.policies = policies
    expanded = expand_policies(cfg)
    assert [(p.rollout.temperature, p.task.reward_fn) for _, p in expanded] == [
        (0.5, "a/b"), (0.5, "c"), (1.0, "a/b"), (1.0, "c")]


def test_late_policy_wait_is_for_runs_of_several_policies():
    two = ["policies=[{name: a}, {name: b}]"]
    assert load_train_config(None, [*two, "late_policy_wait_s=2.5"]).late_policy_wait_s == 2.5
    assert all(cfg.late_policy_wait_s is None
               for _, cfg in expand_policies(load_train_config(None, [*two,
                                                                      "late_policy_wait_s=1"])))
    with pytest.raises(ConfigError, match="late_policy_wait_s applies to runs of several "
                                          "policies; this run has one"):
        load_train_config(None, ["late_policy_wait_s=1"])
    with pytest.raises(ConfigError, match="late_policy_wait_s must be >= 0, got -1"):
        load_train_config(None, [*two, "late_policy_wait_s=-1"])
