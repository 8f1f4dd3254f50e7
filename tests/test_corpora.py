"""Offline stage datasets: every local format loads into the same records, and each kind of bad
row is an error naming source, row and column (or is skipped and counted when configured)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.common.corpora import (
    DatasetConfig,
    DatasetError,
    load_preferences,
    load_sft,
    write_jsonl,
)
from lorafleet.common.tasks import AdditionTask

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
