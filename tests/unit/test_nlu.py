"""NLU as generation: official metrics on known inputs, answer parsing and the label reward,
loaders on small files in the official GLUE / SuperGLUE layouts (tests/data/glue), errors that
name file, row and column, multi-task mixing, and the VADER-labelled set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorafleet.common.configio import ConfigError
from lorafleet.common.corpora import DatasetError
from lorafleet.common.tasks.base import sft_rows
from lorafleet.common.tasks.nlu import SPECS, get_spec, make_reference, mixture_sizes, parse_answer
from lorafleet.common.tasks.nlu_metrics import INVALID, accuracy, f1, macro_f1, mcc
from lorafleet.common.tasks.registry import TaskConfig, build_task
from lorafleet.reward.nlu import label_match

GLUE_DIR = Path(__file__).parents[1] / "data" / "glue"

# The first training rows' gold label words in tests/data/glue (ids, names and booleans as the
# official files spell them).
FIRST_LABELS = {
    "sst2": [" negative", " positive"], "cola": [" yes", " no"], "mrpc": [" yes", " no"],
    "qqp": [" no", " yes"], "mnli": [" maybe", " yes"], "mnli_mismatched": [" maybe", " yes"],
    "qnli": [" no", " yes"], "rte": [" no", " yes"], "boolq": [" yes", " no"],
    "cb": [" no", " yes", " maybe"], "copa": [" 1", " 2"], "wic": [" no", " yes"],
}


def test_metrics_on_known_inputs():
    gold, pred = [1, 1, 0, 0, 1], [1, 0, 0, INVALID, 1]
    assert accuracy(gold, pred, 2) == pytest.approx(3 / 5)
    # class 1: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8
    assert f1(gold, pred, 2) == pytest.approx(0.8)
    # class 0: tp 1, fp 1, fn 1 -> F1 0.5; macro = (0.5 + 0.8) / 2
    assert macro_f1(gold, pred, 2) == pytest.approx(0.65)
    # binary MCC by hand: tp 2, tn 2, fp 1, fn 1 -> (4 - 1) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert mcc([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1], 2) == pytest.approx(1 / 3)
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0], 2) == pytest.approx(1.0)
    # CB-style three classes, all right but one invalid answer
    assert macro_f1([0, 1, 2], [0, 1, INVALID], 3) == pytest.approx((1 + 1 + 0) / 3)


def test_answers_and_label_reward():
    labels = ("negative", "positive")
    assert parse_answer(" Positive.", labels) == 1
    assert parse_answer("negative review", labels) == 0
    assert parse_answer(" pos", labels) == INVALID and parse_answer("", labels) == INVALID
    ref = make_reference("sst2", 1, labels, invalid_reward=-0.5)
    # positive, negative, no label at all (the configured penalty)
    assert label_match([" positive", " negative", " great"], [ref] * 3) == [1.0, 0.0, -0.5]


@pytest.mark.parametrize("name", list(SPECS))
def test_official_layouts_load(name):
    cfg = TaskConfig(name=name, data_dir=str(GLUE_DIR))
    task = build_task(cfg)
    train, held_out = task.examples("train"), task.examples("eval")
    assert [ex.answer for ex in train] == FIRST_LABELS[name]
    assert held_out and cfg.reward_fn == "label_match"
    spec = get_spec(name)
    assert all(ex.prompt.endswith(spec.template[-8:]) for ex in train + held_out)
    ref = json.loads(train[0].reference)
    assert ref["task"] == name and spec.labels[ref["gold"]] == train[0].answer.strip()
    assert sft_rows(train)[0] == {"prompt": train[0].prompt, "response": train[0].answer}


def test_missing_column_and_unknown_label_name_file_row_column(tmp_path):
    (tmp_path / "RTE").mkdir()
    path = tmp_path / "RTE" / "train.tsv"
    path.write_text("index\tsentence1\tlabel\n0\tA man.\tentailment\n")
    with pytest.raises(DatasetError, match=r"RTE/train.tsv: row 0: missing column 'sentence2'"):
        build_task(TaskConfig(name="rte", data_dir=str(tmp_path))).examples("train")
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(DatasetError, match=r"train.tsv: row 1: column 'label': unknown label "
                                           r"'maybe'"):
        build_task(TaskConfig(name="rte", data_dir=str(tmp_path))).examples("train")
    skipping = build_task(TaskConfig(name="rte", data_dir=str(tmp_path), skip_bad_rows=True))
    assert len(skipping.examples("train")) == 1
    with pytest.raises(DatasetError, match=r"no eval file; looked for .*RTE/dev.tsv"):
        skipping.examples("eval")
    (tmp_path / "CB").mkdir()
    (tmp_path / "CB" / "train.jsonl").write_text('{"premise": "p", "label": "neutral"}\n')
    with pytest.raises(DatasetError, match=r"row 0: missing column 'hypothesis'"):
        build_task(TaskConfig(name="cb", data_dir=str(tmp_path))).examples("train")


def test_unknown_task_names_and_unused_shots_are_config_errors():
    from lorafleet.cluster.config import load_train_config

    with pytest.raises(ConfigError, match="task.name: unknown task 'sst3'"):
        load_train_config(None, ["task.name=sst3"])
    with pytest.raises(ConfigError, match="task.tasks"):
        load_train_config(None, ["task.name=multi", "task.tasks=[sst2, nope]"])
    with pytest.raises(ConfigError, match="task.shots=2: task 'addition' takes no in-context"):
        load_train_config(None, ["task.shots=2"])


def test_mixture_sizes():
    assert mixture_sizes([900, 100], "proportional", 2.0) == [900, 100]
    # T=2: shares ~ sqrt(size): 30 : 10 of 1000 rows
    assert mixture_sizes([900, 100], "temperature", 2.0) == [750, 250]
    assert mixture_sizes([900, 100], "temperature", 1.0) == [900, 100]


def test_multi_task_mixes_training_and_reports_each_task():
    task = build_task(TaskConfig(name="multi", tasks=["sst2", "cb"], data_dir=str(GLUE_DIR),
                                 mixing="temperature", mixing_temperature=0.25))
    train = task.examples("train")
    per_task = [json.loads(ex.reference)["task"] for ex in train]
    # T = 1/4: shares ~ size^4 = 16 : 81 of 5 rows -> 1 SST-2 row, 4 CB rows (one repeated)
    assert (per_task.count("sst2"), per_task.count("cb")) == (1, 4)
    assert len({ex.prompt for ex in train if "Premise" in ex.prompt}) == 3
    held_out = task.examples("eval")
    pairs = [(ex.answer, ex.reference) for ex in held_out]
    pairs[0] = (" nonsense", pairs[0][1])
    metrics = task.answer_metrics(pairs)
    assert set(metrics) == {"sst2/accuracy", "sst2/invalid_rate", "cb/accuracy", "cb/macro_f1",
                            "cb/invalid_rate"}
    assert metrics["sst2/invalid_rate"] == 0.5 and metrics["cb/accuracy"] == 1.0
    assert task.count_invalid(pairs) == {"invalid_answers": 1}


def test_few_shot_prompts_prefix_training_examples():
    zero = build_task(TaskConfig(name="sst2", data_dir=str(GLUE_DIR))).examples("eval")
    two = build_task(TaskConfig(name="sst2", data_dir=str(GLUE_DIR), shots=2)).examples("eval")
    train = build_task(TaskConfig(name="sst2", data_dir=str(GLUE_DIR))).examples("train")
    for z, t in zip(zero, two, strict=True):
        assert t.prompt.endswith(z.prompt) and t.reference == z.reference
        assert all(ex.prompt + ex.answer in t.prompt for ex in train)


def test_vader_set_is_labelled_by_vader_and_written_in_sst2_layout(tmp_path):
    from lorafleet.common.tasks.vader import compound, vader_set, write_sst2_layout

    data = vader_set()
    sentences = {split: [f"{o} {r}" for o, r, _ in rows] for split, rows in data.items()}
    assert not set(sentences["train"]) & set(sentences["eval"])
    for split, rows in data.items():
        assert sum(label for *_, label in rows) * 2 == len(rows)  # balanced
        for (*_, label), s in list(zip(rows, sentences[split], strict=True))[:200]:
            assert (compound(s) >= 0.05) == bool(label) and abs(compound(s)) >= 0.05
    write_sst2_layout(tmp_path)
    from_files = build_task(TaskConfig(name="sst2", data_dir=str(tmp_path))).examples("eval")
    in_memory = build_task(TaskConfig(name="sentiment_vader")).examples("eval")
    assert [(e.prompt, e.answer) for e in from_files] == [(e.prompt, e.answer) for e in in_memory]


def test_write_positive_reward_is_vader_compound():
    from lorafleet.reward.registry import get_reward_fn

    cfg = TaskConfig(name="write_positive")
    task = build_task(cfg)
    fn = get_reward_fn(cfg.reward_fn)

    def reward(text: str) -> float:
        return fn(prompts=[""], completions=[text], reference=[""])[0]

    assert reward(" wonderful and lovely") > 0.5 > -0.5 > reward(" awful and nasty")
    assert reward(" not good") < 0 and math.isclose(reward(" the"), 0.0)
    # demonstrations come from sentences VADER calls positive (the opening may carry it:
    # "my friends said" scores positive on its own)
    examples = task.examples("train")
    assert min(fn(completions=[ex.prompt + ex.answer for ex in examples])) >= 0.05
    assert task.answer_metrics([(" great", "")])["write_positive/vader_compound"] > 0


def test_cli_tasks_and_make_data_sentiment(tmp_path, capsys):
    from lorafleet.cluster.cli import main

    main(["tasks"])
    listing = capsys.readouterr().out
    for name in ["addition", *SPECS, "sentiment_vader", "write_positive", "multi"]:
        assert f"| {name} |" in listing
    assert "| cb | aps/super_glue/cb [validation] |" in listing
    main(["make-data", "sentiment", str(tmp_path)])
    lines = (tmp_path / "SST-2" / "dev.tsv").read_text().splitlines()
    assert lines[0] == "sentence\tlabel" and len(lines) == 201


def test_result_table_markdown_and_stage_labels(tmp_path):
    from lorafleet.cluster.bench.harness import results_markdown, write_results
    from lorafleet.cluster.bench.nlu_table import stage_label

    results = {"0-shot": {"eval_greedy": 0.0, "rte/accuracy": 0.5, "rte/invalid_rate": 0.25},
               "SFT": {"rte/accuracy": 0.625, "cb/macro_f1": 0.4}}
    assert results_markdown(results).splitlines() == [
        "| task / metric | 0-shot | SFT |", "| --- | --- | --- |",
        "| rte/accuracy | 0.500 | 0.625 |", "| rte/invalid_rate | 0.250 | — |",
        "| cb/macro_f1 | — | 0.400 |",
    ]
    assert [stage_label(["sft", "rl"], i, "ppo") for i in (0, 1)] == ["SFT", "SFT+PPO"]
    write_results(tmp_path, "table", results, "lorafleet nlu-table --shots 4", "rte")
    assert json.loads((tmp_path / "table.json").read_text()) == results
    assert (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"
    # the Markdown names the command it came from, then holds the table
    markdown = (tmp_path / "table.md").read_text()
    assert "`lorafleet nlu-table --shots 4`" in markdown
    assert markdown.endswith(results_markdown(results))
