"""Tasks and user data: fixed stratified splits, CSV/TSV/JSONL reading, bad rows, label maps, collation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
import torch

from deltaformer.data.collate import Encoded, PadCollator
from deltaformer.data.tabular import DataError, Example, Fields, LabelMap, read_table
from deltaformer.data.tasks import load_task, stratified_split

TEST_SPLIT_SHA256 = {"rt-polarity": "b011137396fce20e", "rt-reviews": "a60721315d00522a", "bbc-news": "db32bbac28b58a8c"}


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label=label) for label, n in counts.items() for i in range(n)]


def test_stratified_split_is_fixed_disjoint_and_balanced():
    examples = _examples({"a": 50, "b": 30, "c": 20})
    train, val, test = stratified_split(examples)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert Counter(e.label for e in val) == {"a": 5, "b": 3, "c": 2}
    assert len({e.text for e in train + val + test}) == 100
    assert stratified_split(examples)[2] == test
    assert stratified_split(examples, seed=1)[2] != test


def test_csv_tsv_jsonl_with_pairs_and_chosen_fields(tmp_path):
    (tmp_path / "d.csv").write_text('sentence,other,y\n"a, quoted text",second,pos\nplain,x,neg\n', encoding="utf-8")
    (tmp_path / "d.tsv").write_text("sentence\tother\ty\nhello\tthere\t1\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "hi", "other": "yo", "y": 3}) + "\n\n", encoding="utf-8")
    fields = Fields(text="sentence", text_pair="other", label="y")
    csv_rows = read_table(tmp_path / "d.csv", fields).examples
    assert csv_rows[0] == Example("a, quoted text", "second", "pos", f"{tmp_path / 'd.csv'}:2")
    assert read_table(tmp_path / "d.tsv", fields).examples[0].label == "1"
    assert read_table(tmp_path / "d.jsonl", fields).examples[0] == Example("hi", "yo", "3", f"{tmp_path / 'd.jsonl'}:1")


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\ngood one,pos\n,neg\n\"multi\nline\",pos\nbad \xff bytes,neg\nno label,\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: missing or empty text field 'text'.*--skip-bad-rows"):
        read_table(path)
    table = read_table(path, skip_bad_rows=True)
    assert [e.text for e in table.examples] == ["good one", "multi\nline"]
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in table.skipped] == ["3", "6", "7"]
    assert "not valid UTF-8" in table.skipped[1]
    assert read_table(path, need_label=False, skip_bad_rows=True).examples[-1].text == "no label"


def test_jsonl_errors_and_missing_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": oops}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_table(path)
    assert len(read_table(path, skip_bad_rows=True).skipped) == 2
    (tmp_path / "c.csv").write_text("body,label\nx,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="no column 'text'.*columns: body, label.*--text-field"):
        read_table(tmp_path / "c.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown data format"):
        read_table(path.with_suffix(".xlsx").write_text("") or path.with_suffix(".xlsx"))


def test_label_map_order_round_trip_and_unknown_label():
    labels = LabelMap.from_examples(_examples({"10": 1, "2": 1, "-1": 1}))
    assert labels.labels == ["-1", "2", "10"]
    assert LabelMap.from_json(json.loads(json.dumps(labels.to_json()))).labels == labels.labels
    assert LabelMap.from_examples(_examples({"pos": 1, "neg": 1})).label2id == {"neg": 0, "pos": 1}
    with pytest.raises(DataError, match=r"f\.csv:9: unknown label 'maybe'"):
        labels.encode(Example("t", label="maybe", source="f.csv:9"))


def test_pad_collator_pads_to_the_longest_and_masks():
    batch = PadCollator(pad_token_id=0)([Encoded([5, 6, 7], [0, 0, 1], 1), Encoded([5], [0], 0)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))
    assert "labels" not in PadCollator()([Encoded([1], [0])])


@pytest.mark.assets
def test_builtin_tasks_have_fixed_documented_splits():
    polarity = load_task("rt-polarity")
    assert polarity.labels == ["negative", "positive"]
    assert {s: len(polarity.split(s)) for s in ("train", "validation", "test")} == {
        "train": 3200, "validation": 400, "test": 400}
    assert polarity.label_counts("test") == {"negative": 200, "positive": 200}
    bbc = load_task("bbc-news")
    assert len(bbc.labels) == 5 and sum(len(bbc.split(s)) for s in ("train", "validation", "test")) == 2225
    assert all(e.text and "." in e.text for e in bbc.split("validation"))
    reviews = load_task("rt-reviews")
    assert len(reviews.split("train")) == 1200 and len(reviews.split("test")[0].text.split()) > 100
    for task, digest in TEST_SPLIT_SHA256.items():  # the test sets never change between versions
        test = load_task(task).split("test")
        assert hashlib.sha256("\n".join(f"{e.label}\t{e.text}" for e in test).encode()).hexdigest()[:16] == digest
    with pytest.raises(DataError, match="unknown task"):
        load_task("imdb")


@pytest.mark.assets
def test_tasks_verb_lists_sequence_to_sequence_tasks_with_their_group_balance(capsys):
    import json

    from deltaformer.cli.main import main

    assert main(["tasks", "bbc-headlines", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["bbc-headlines"]
    sizes = {split: s["size"] for split, s in info["splits"].items()}
    assert sizes == {"train": 1672, "validation": 209, "test": 208}
    assert info["max_target_length"] == 32 and len(info["labels"]) == 5
    assert all(sum(s["labels"].values()) == s["size"] for s in info["splits"].values())
    assert main(["tasks"]) == 0 and "bbc-headlines:" in capsys.readouterr().out
