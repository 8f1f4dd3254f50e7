"""Offline stage datasets: every local format loads into the same records, and each kind of bad
row is an error naming source, row and column (or is skipped and counted when configured)."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.common.corpora import (
    DatasetConfig,
    DatasetError,
    load_paired_levels,
    load_preferences,
    load_sft,
    write_jsonl,
)
from lorafleet.common.tasks.addition import AdditionTask

TASK = AdditionTask()
ROWS = [{"prompt": "1+2=", "response": "3"}, {"prompt": "10+5=", "response": "15"}]


def write(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix in (".csv", ".tsv"):
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(rows, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".tsv"])
def test_every_format_gives_the_same_examples(suffix, tmp_path, tokenizer):
    cfg = DatasetConfig(path=write(tmp_path / f"sft{suffix}", ROWS))
    data = load_sft(cfg, TASK, tokenizer, max_tokens=64)
    assert [e.index for e in data.items] == [0, 1]
    first = data.items[0]
    assert first.prompt_ids == tokenizer("1+2=").input_ids
    # the response is what the model must generate: its tokens, then EOS
    assert tokenizer.decode(first.response_ids[:-1]) == "3"
    assert first.response_ids[-1] == tokenizer.eos_token_id


def test_task_source_and_custom_columns(tmp_path, tokenizer):
    task_data = load_sft(DatasetConfig(), TASK, tokenizer, 64)
    assert len(task_data.items) == len(TASK.examples("train"))
    pairs = load_preferences(DatasetConfig(split="eval"), TASK, tokenizer, 64)
    assert len(pairs.items) == len(TASK.examples("eval"))
    assert all(p.chosen_ids != p.rejected_ids for p in pairs.items)
    renamed = [{"question": r["prompt"], "answer": r["response"]} for r in ROWS]
    cfg = DatasetConfig(path=write(tmp_path / "qa.jsonl", renamed), prompt_column="question",
                        response_column="answer")
    assert len(load_sft(cfg, TASK, tokenizer, 64).items) == 2


BAD_SFT = [
    ({"prompt": "1+1="}, "row 1: missing column 'response'"),
    ({"prompt": "1+1=", "response": "  "}, "row 1: column 'response' is empty"),
    ({"prompt": "1+1=", "response": "9" * 200}, "row 1: too long"),
]


@pytest.mark.parametrize(("bad_row", "message"), BAD_SFT)
def test_bad_sft_row_is_named_or_skipped_and_counted(bad_row, message, tmp_path, tokenizer):
    path = write(tmp_path / "bad.jsonl", [ROWS[0], bad_row, ROWS[1]])
    with pytest.raises(DatasetError, match=f"bad.jsonl: {message}"):
        load_sft(DatasetConfig(path=path), TASK, tokenizer, 64)
    data = load_sft(DatasetConfig(path=path, skip_bad_rows=True), TASK, tokenizer, 64)
    assert [e.index for e in data.items] == [0, 2]
    assert sum(data.skipped.values()) == 1
    assert "skipped 1 bad rows" in data.describe()


def test_bad_preference_rows(tmp_path, tokenizer):
    good = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    same = {"prompt": "1+2=", "chosen": "3", "rejected": "3"}
    path = write(tmp_path / "pairs.jsonl", [good, same])
    with pytest.raises(DatasetError, match="row 1: identical chosen and rejected"):
        load_preferences(DatasetConfig(path=path), TASK, tokenizer, 64)
    path = write(tmp_path / "pairs2.jsonl", [good, {"prompt": "1+2=", "chosen": "3"}])
    with pytest.raises(DatasetError, match="row 1: missing column 'rejected'"):
        load_preferences(DatasetConfig(path=path), TASK, tokenizer, 64)


def test_unreadable_sources_are_named(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="does not exist"):
        load_sft(DatasetConfig(path=str(tmp_path / "nope.jsonl")), TASK, tokenizer, 64)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+2=", "response": "3"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match="broken.jsonl: line 2 is not valid JSON"):
        load_sft(DatasetConfig(path=str(broken)), TASK, tokenizer, 64)
    empty = write(tmp_path / "empty.jsonl", [{"prompt": "x", "response": ""}])
    with pytest.raises(DatasetError, match="no usable rows"):
        load_sft(DatasetConfig(path=empty, skip_bad_rows=True), TASK, tokenizer, 64)


HH_ROW = {  # Anthropic/hh-rlhf layout: two whole dialogues differing in the last turn
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant: 6",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant: 7",
}
TLDR_ROW = {  # openai/summarize_from_feedback "comparisons" layout
    "info": {"id": "t3_x", "post": "My cat ate my homework.", "title": "Cat", "subreddit": "pets"},
    "summaries": [{"text": " cat ate homework", "policy": "a"}, {"text": " a post", "policy": "b"}],
    "choice": 0,
}


def test_hub_layouts_map_to_prompt_chosen_rejected(tmp_path, tokenizer):
    hh = load_preferences(
        DatasetConfig(path=write(tmp_path / "hh.jsonl", [HH_ROW]), row_format="hh-rlhf"),
        TASK, tokenizer, 10_000,
    ).items[0]
    assert tokenizer.decode(hh.prompt_ids, skip_special_tokens=True) == (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:"
    )
    assert tokenizer.decode(hh.chosen_ids, skip_special_tokens=True) == " 6"
    assert tokenizer.decode(hh.rejected_ids, skip_special_tokens=True) == " 7"
    tldr = load_preferences(
        DatasetConfig(path=write(tmp_path / "tldr.jsonl", [TLDR_ROW, {**TLDR_ROW, "choice": 1}]),
                      row_format="summarize-from-feedback"),
        TASK, tokenizer, 10_000,
    ).items
    assert tokenizer.decode(tldr[0].prompt_ids, skip_special_tokens=True) == (
        "SUBREDDIT: r/pets\nTITLE: Cat\nPOST: My cat ate my homework.\n\nTL;DR:"
    )
    assert tokenizer.decode(tldr[0].chosen_ids, skip_special_tokens=True) == " cat ate homework"
    assert tldr[1].chosen_ids == tldr[0].rejected_ids
    # the meet stage's two levels from the same rows: rejected = 0, chosen = 1
    levels = load_paired_levels(
        DatasetConfig(path=write(tmp_path / "hh2.jsonl", [HH_ROW]), row_format="hh-rlhf"),
        TASK, tokenizer, 10_000,
    ).items
    assert [(e.level, e.prompt_ids, e.response_ids) for e in levels] == [
        (0, hh.prompt_ids, hh.rejected_ids), (1, hh.prompt_ids, hh.chosen_ids)]


@pytest.mark.parametrize(("row_format", "row", "problem"), [
    ("hh-rlhf", {"chosen": "no turns here", "rejected": "x"}, "has no '\\n\\nAssistant:' turn"),
    ("hh-rlhf", {**HH_ROW, "rejected": "\n\nHuman: Hi\n\nAssistant: 7"},
     "does not share the dialogue"),
    ("summarize-from-feedback", {**TLDR_ROW, "choice": 2}, "'summaries' / 'choice'"),
    ("summarize-from-feedback", {**TLDR_ROW, "info": {}}, "column 'info' has no post"),
])
def test_bad_hub_layout_rows_are_named(row_format, row, problem, tmp_path, tokenizer):
    path = write(tmp_path / "p.jsonl", [HH_ROW if row_format == "hh-rlhf" else TLDR_ROW, row])
    with pytest.raises(DatasetError, match=f"row 1: .*{re.escape(problem)}"):
        load_preferences(DatasetConfig(path=path, row_format=row_format), TASK, tokenizer, 10_000)


def test_margin_and_tie_columns(tmp_path, tokenizer):
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": 1.5, "tie": "false"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 0, "tie": "true"}]
    cfg = DatasetConfig(path=write(tmp_path / "p.jsonl", rows), margin_column="margin",
                        tie_column="tie")
    pairs = load_preferences(cfg, TASK, tokenizer, 64).items
    assert [(p.margin, p.tie) for p in pairs] == [(1.5, False), (0.0, True)]
    bad = [{**rows[0], "margin": -1}]
    cfg.path = write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DatasetError, match="row 0: column 'margin' is not a finite number >= 0"):
        load_preferences(cfg, TASK, tokenizer, 64)
    cfg.skip_bad_rows = True
    cfg.path = write(tmp_path / "mixed.jsonl", rows + [{**rows[0], "tie": "maybe"}])
    loaded = load_preferences(cfg, TASK, tokenizer, 64)
    assert len(loaded.items) == 2 and loaded.skipped == {"column 'tie' is not a boolean": 1}


def test_task_pairs_with_random_rejected_answers(tokenizer):
    rows = TASK.preference_rows("train", rejected="random")
    assert all(r["rejected"] != r["chosen"] and 0 <= int(r["rejected"]) <= 98 for r in rows)
    near = TASK.preference_rows("train")
    far = sum(abs(int(r["rejected"]) - int(r["chosen"])) > 10 for r in rows)
    assert far > len(rows) // 2 and all(
        abs(int(r["rejected"]) - int(r["chosen"])) in (1, 10) for r in near[:50]
        if int(r["chosen"]) >= 10
    )
