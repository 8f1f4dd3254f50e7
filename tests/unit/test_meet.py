"""The meet stage: its config and data checks, level binning, the side-by-side LoRA the fleet
serves for a level (by hand), and on a real PEFT model that every level's control trains and
that the served policy of a level is its control and the shared LoRA together; soft-prompt
controls: the prefix is placed as tokens would be, stage 1 trains only the soft prompts, stage 2
them and the shared LoRA, and a level's snapshot carries its soft prompt, checksummed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import new_learner
from lorafleet.cluster.bench.meet_table import over_seeds, variants
from lorafleet.cluster.config import TrainConfig, load_train_config
from lorafleet.common.configio import ConfigError, from_dict, to_dict
from lorafleet.common.corpora import DatasetConfig, DatasetError, level_of, load_leveled
from lorafleet.common.records import SFTExample
from lorafleet.common.tasks.addition import AdditionTask
from lorafleet.learner.meet import SHARED, control_name, prefixed_logprobs, side_by_side
from lorafleet.learner.model import collate

CONFIG = Path(__file__).parents[2] / "deploy" / "configs" / "meet_vader.yaml"


def test_side_by_side_sums_the_scaled_updates():
    # s1 B1 A1 = 0.5 * [[2]] @ [[1, 0]] = [[1, 0]];  s2 B2 A2 = 2 * [[3]] @ [[0, 1]] = [[0, 6]]
    first = {"m.lora_A.weight": torch.tensor([[1.0, 0.0]]),
             "m.lora_B.weight": torch.tensor([[2.0]])}
    second = {"m.lora_A.weight": torch.tensor([[0.0, 1.0]]),
              "m.lora_B.weight": torch.tensor([[3.0]])}
    both = side_by_side(first, 0.5, second, 2.0)
    assert both["m.lora_A.weight"].shape == (2, 2) and both["m.lora_B.weight"].shape == (1, 2)
    update = both["m.lora_B.weight"] @ both["m.lora_A.weight"]
    assert torch.equal(update, torch.tensor([[1.0, 6.0]]))


def test_level_of_bins_scores():
    scores = (-0.9, -0.3, 0.0, 0.29, 0.3, 1.0)
    assert [level_of(s, [-0.3, 0.3]) for s in scores] == [0, 1, 1, 1, 2, 2]


def test_meet_config_errors():
    base = ["stages=[meet]"]
    cfg = load_train_config(None, [*base, "meet.bins=[-0.5,0,0.5]"])
    assert cfg.meet.levels == 4 and cfg.served_lora_rank == 16
    cases = [
        (["meet.level_column=level"], "set one of meet.level_column, meet.score_column and "
                                      "meet.pairs"),
        (["meet.pairs=true"], "set one of meet.level_column, meet.score_column and meet.pairs"),
        (["meet.pairs=true", "meet.score_column=null"], "leave them empty"),
        (["meet.pairs=true", "meet.score_column=null", "meet.bins=[]", "meet.control=text",
          "meet.stage1_epochs=0", "meet.control_texts=[a,b]"], "not supported"),
        (["meet.bins=[0.3,-0.3]"], "meet.bins must be increasing"),
        (["meet.stage1_epochs=0", "meet.stage2_epochs=0"], "not both 0"),
        (["meet.control=text", "meet.stage1_epochs=0"], "needs meet.control_texts"),
        (["meet.control=text", "meet.control_texts=[a,b,c]"], "set meet.stage1_epochs=0"),
        (["meet.control_texts=[a,b,c]"], "control_texts is for meet.control=text"),
        (["meet.best_level=3"], r"meet.best_level=3: the levels are 0..2"),
        (["meet.rank=16"], r"meet.rank \+ lora.rank = 24"),
        (["meet.prompt_tokens=4"], "meet.prompt_tokens is for meet.control=prompt, this is "
                                   "meet.control=lora"),
        (["meet.control=prompt", "meet.rank=8"], "meet.rank is for meet.control=lora"),
        (["meet.control=prompt", "meet.prompt_tokens=0"], "meet.prompt_tokens must be >= 1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_train_config(None, [*base, *overrides])
    with pytest.raises(ConfigError, match="meet stage comes last"):
        load_train_config(None, ["stages=[meet, rl]", "meet.control=text", "meet.stage1_epochs=0",
                                 "meet.control_texts=[a,b,c]"])
    with pytest.raises(ConfigError, match="control=prompt the meet stage comes last"):
        load_train_config(None, ["stages=[meet, rl]", "meet.control=prompt"])
    pairs = load_train_config(None, [*base, "meet.pairs=true", "meet.score_column=null",
                                     "meet.bins=[]"])
    assert pairs.meet.levels == 2
    prompt = load_train_config(None, [*base, "meet.control=prompt"])
    assert prompt.meet.control_size == 8 and prompt.served_lora_rank == 8
    assert prompt.serves_soft_prompts and not cfg.serves_soft_prompts
    with pytest.raises(ConfigError, match="2 texts for 3 levels"):
        load_train_config(None, [*base, "meet.control=text", "meet.stage1_epochs=0",
                                 "meet.control_texts=[a,b]"])


def test_leveled_data_from_scores_levels_and_control_texts(tmp_path, tokenizer):
    rows = [{"prompt": "1+1=", "response": "2", "score": s, "level": lv}
            for s, lv in ((-0.9, 0), (0.1, 1), (0.8, 1), ("0.5", 1))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, data = AdditionTask(), DatasetConfig(path=str(path))
    by_score = load_leveled(data, None, "score", [-0.3, 0.3], task, tokenizer, 64)
    assert [e.level for e in by_score.items] == [0, 1, 2, 2]  # a CSV-like "0.5" string too
    by_column = load_leveled(data, "level", None, [], task, tokenizer, 64, ["bad:", "good:"])
    assert [e.level for e in by_column.items] == [0, 1, 1, 1]
    assert by_column.items[0].prompt_ids == tokenizer("bad: 1+1=").input_ids
    with pytest.raises(DatasetError, match="no rows of level 1"):
        load_leveled(data, None, "score", [-0.5, -0.3, 0.3], task, tokenizer, 64)
    path.write_text(json.dumps({"prompt": "1+1=", "response": "2", "score": "high"}) + "\n")
    with pytest.raises(DatasetError, match="row 0: column 'score' is not a finite number"):
        load_leveled(data, None, "score", [0.0], task, tokenizer, 64)


def test_every_control_trains_and_a_level_serves_control_plus_shared(tiny_model_path, tokenizer):
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, stages=("meet",))
    examples = [SFTExample(i, tokenizer(ex.prompt).input_ids,
                           tokenizer(ex.answer, add_special_tokens=False).input_ids, level=i % 3)
                for i, ex in enumerate(AdditionTask().examples("train")[:24])]
    learner.start_meet("lora", 3, 8)
    for with_shared in (False, True):
        learner.start_meet_phase(2e-3, with_shared)
        learner.meet_step(examples)
    names = [control_name(k) for k in range(3)] + [SHARED]
    for name in names:  # lora_B starts at zero: a trained adapter's is not
        assert any(p.abs().sum() > 0 for n, p in learner.net.model.named_parameters()
                   if f".{name}." in n and "lora_B" in n), name
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        for level in (2, 0):  # the first call widens the policy to rank 16, the next reuses it
            learner.use_level(level)
            served = learner.net.logprobs(batch)
            both = learner.net.logprobs(batch, adapters=[control_name(level), SHARED])
            assert learner.publish().peft_config["r"] == 16
            assert float((served - both).abs().max()) < 1e-5
        alone = learner.net.logprobs(batch, adapters=[control_name(2), SHARED])
        assert float((served - alone).abs().max()) > 1e-3  # levels differ


def test_soft_prompt_controls(tiny_model_path, tokenizer):
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, stages=("meet",))
    net = learner.net
    examples = [SFTExample(i, tokenizer(ex.prompt).input_ids,
                           tokenizer(ex.answer, add_special_tokens=False).input_ids, level=i % 3)
                for i, ex in enumerate(AdditionTask().examples("train")[:24])]
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                    tokenizer.pad_token_id)
    learner.start_meet("prompt", 3, 4)
    soft = learner.meet.controls.embeddings
    assert soft.shape == (3, 4, net.model.get_base_model().config.hidden_size)
    with torch.no_grad():
        # a prefix of some tokens' embeddings gives the log-probs of those tokens before the
        # prompt: the soft prompt sits before the prompt, masked in, the positions shifted
        lead = tokenizer("7+8=", add_special_tokens=False).input_ids
        prefix = net.model.get_input_embeddings().weight[lead]
        led = collate([lead + e.prompt_ids for e in examples],
                      [e.response_ids for e in examples], tokenizer.pad_token_id)
        gap = (prefixed_logprobs(net, batch, [], prefix.expand(len(examples), -1, -1))
               - net.logprobs(led, adapters=[])).abs() * batch.mask
        assert float(gap.max()) < 1e-5
        # each level's soft prompt changes the log-probs (here: from its vocabulary start)
        levels = [learner.meet.level_logprobs(batch, k, with_shared=False) for k in range(3)]
        assert float((levels[0] - levels[1]).abs().max()) > 1e-2
    # stage 1: the soft prompts train, every weight of the model (LoRAs included) stays
    weights = {n: p.detach().clone() for n, p in net.model.named_parameters()}
    start = soft.detach().clone()
    learner.start_meet_phase(1e-2, with_shared=False)
    learner.meet_step(examples)
    assert all(torch.equal(p, weights[n]) for n, p in net.model.named_parameters())
    assert all(float((soft[k].detach() - start[k]).abs().max()) > 1e-3 for k in range(3))
    # stage 2: the soft prompts and the shared LoRA train, the policy adapter does not
    learner.start_meet_phase(1e-2, with_shared=True)
    learner.meet_step(examples)
    changed = {n for n, p in net.model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(f".{SHARED}." in n for n in changed)
    assert any(".lora_B." in n for n in changed)
    # a level's snapshot: the shared LoRA at scale 1 (rank 8) and its own soft prompt; the
    # checksum covers the soft prompt
    snapshot = learner.publish_level(1)
    assert snapshot.peft_config["r"] == 8 and torch.equal(snapshot.soft_prompt, soft[1])
    snapshot.verify()
    snapshot.soft_prompt[0, 0] += 1.0
    with pytest.raises(ValueError, match="checksum"):
        snapshot.verify()
    with torch.no_grad():  # the policy later stages continue from: the shared LoRA
        learner.use_level(2)
        assert float((net.logprobs(batch) - net.logprobs(batch, adapters=[SHARED])
                      ).abs().max()) < 1e-5


def test_meet_table_variants_are_valid_configs_and_margins_over_seeds():
    cfg = load_train_config(CONFIG)
    runs = variants(cfg, Path("sft.jsonl"), Path("pairs.jsonl"), 3)
    assert runs["MEET soft prompt"].meet.control == "prompt"
    for name, variant in runs.items():  # each passes the checks a loaded config passes
        assert from_dict(TrainConfig, to_dict(variant)).stages == variant.stages, name
    seeds = {s: {name: {"reward/sampled": value + s, "reward/greedy": value - s,
                        "cost/wall_s": 10.0 * (s + 1)}
                 for name, value in (("SFT (best level)", 0.1), ("Chain of Hindsight", 0.0),
                                     ("DPO", 0.2), ("MEET-LoRA", 0.3))}
             for s in (0, 1)}
    seeds[1]["DPO"]["reward/sampled"] = 0.0  # MEET-LoRA - DPO, sampled: 0.3 - 0.2, 1.3 - 0.0
    table, margins = over_seeds(seeds)
    assert table["MEET-LoRA"] == pytest.approx({
        "reward/sampled seed 0": 0.3, "reward/sampled seed 1": 1.3, "reward/sampled mean": 0.8,
        "reward/greedy seed 0": 0.3, "reward/greedy seed 1": -0.7, "reward/greedy mean": -0.2,
        "cost/wall_s mean": 15.0})
    assert list(margins) == ["MEET-LoRA"]
    assert margins["MEET-LoRA"]["sampled/over DPO: min"] == pytest.approx(0.1)
    assert margins["MEET-LoRA"]["sampled/over DPO: max"] == pytest.approx(1.3)
    assert margins["MEET-LoRA"]["greedy/over SFT (best level): max"] == pytest.approx(0.2)


def test_text_controls_train_the_shared_lora_and_the_policy_becomes_it(tiny_model_path,
                                                                       tokenizer):
    learner = new_learner(tiny_model_path, tokenizer.pad_token_id, stages=("meet",))
    examples = [SFTExample(i, tokenizer(ex.prompt).input_ids,
                           tokenizer(ex.answer, add_special_tokens=False).input_ids, level=i % 2)
                for i, ex in enumerate(AdditionTask().examples("train")[:16])]
    learner.start_meet("text", 2, 0)  # Chain of Hindsight: the control text is in the prompts
    learner.start_meet_phase(1e-2, with_shared=True)
    weights = {n: p.detach().clone() for n, p in learner.net.model.named_parameters()}
    learner.meet_step(examples)
    changed = {n for n, p in learner.net.model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed and all(f".{SHARED}." in n for n in changed)
    batch = collate([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        learner.use_level(1)
        gap = learner.net.logprobs(batch) - learner.net.logprobs(batch, adapters=[SHARED])
        assert float(gap.abs().max()) < 1e-5
        assert float((learner.net.logprobs(batch) - learner.net.reference_logprobs(batch)
                      ).abs().max()) > 1e-3
