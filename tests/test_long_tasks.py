"""The long-document tasks: the bbc-headlines data path, the LED warm-started from MiniLM, and smoke runs of
benchmarks/long_documents.py and benchmarks/headlines.py on a handful of examples (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltaformer.data.collate import Seq2SeqCollator, Seq2SeqEncoded

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_seq2seq_collator_pads_labels_with_ignore_index():
    items = [Seq2SeqEncoded([101, 7, 8, 102], [5, 102]), Seq2SeqEncoded([101, 9, 102], [5, 6, 7, 102])]
    batch = Seq2SeqCollator(pad_token_id=0, global_first=True)(items)
    assert batch["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 102, -100, -100], [5, 6, 7, 102]]
    assert batch["global_attention_mask"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
    assert "global_attention_mask" not in Seq2SeqCollator()(items)


@pytest.mark.assets
def test_bbc_headlines_splits_are_fixed_and_disjoint():
    from deltaformer.data.tabular import DataError
    from deltaformer.data.tasks import load_seq2seq_task, load_task

    task = load_seq2seq_task("bbc-headlines")
    sizes = {name: len(task.split(name)) for name in ("train", "validation", "test")}
    assert sizes == {"train": 1672, "validation": 209, "test": 208}
    train = {p.source for p in task.split("train")}
    assert not train & {p.source for p in task.split("test")}  # repeated articles are kept once
    first = task.split("test")[0]
    assert first.target == "West End to honour finest shows" and first.label == "entertainment"
    assert first.source.startswith("The West End is honouring its finest stars and shows")
    with pytest.raises(DataError, match="load_seq2seq_task"):
        load_task("bbc-headlines")


@pytest.mark.assets
def test_encode_pairs_ends_targets_with_eos():
    from deltaformer.data.collate import encode_pairs
    from deltaformer.data.tasks import TextPair
    from deltaformer.tokenizer import AutoTokenizer

    tok = AutoTokenizer.from_pretrained("minilm")
    long_title = "a headline that is far too long to keep whole"
    (short, cut) = encode_pairs(tok, [TextPair("The cat sat. It purred.", "Cat sits"),
                                      TextPair("Body " * 50, long_title)], 16, 5)
    assert short.input_ids[0] == tok.cls_token_id and short.input_ids[-1] == tok.sep_token_id
    assert short.labels == [*tok("Cat sits", add_special_tokens=False)["input_ids"], tok.sep_token_id]
    assert len(cut.input_ids) == 16 and len(cut.labels) == 5 and cut.labels[-1] == tok.sep_token_id


@pytest.mark.assets
def test_led_from_bert_encoder_is_the_bert_and_decoder_is_warm_started(minilm_dir):
    from deltaformer.convert import led_from_bert
    from deltaformer.models.auto import load_model

    led = led_from_bert(minilm_dir, max_source_length=256, window=64, max_target_length=32).eval()
    bert = load_model(minilm_dir).eval()
    assert (led.config.decoder_start_token_id, led.config.eos_token_id, led.config.pad_token_id) == (101, 102, 0)
    for module in led.modules():  # LED's LayerNorm eps is 1e-5; BERT's 1e-12 makes the two exactly comparable
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-12
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102] * 8])  # 64 tokens: the window covers it
    with torch.no_grad():
        ours = led.backbone.encode(ids).last_hidden_state
        theirs = bert(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    layer, source = led.backbone.decoder.layers[3], bert.layers[3]
    torch.testing.assert_close(layer.self_attn.query.weight, source.attn.query.weight)
    torch.testing.assert_close(layer.mlp.down.weight, source.mlp.down.weight)
    assert not torch.equal(layer.encoder_attn.query.weight, source.attn.query.weight)  # cross-attention is fresh
    assert led.backbone.decoder.positions.num_embeddings == 32


def run_script(name: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.assets
def test_long_documents_smoke():
    rows = run_script("long_documents.py", "--epochs", "1", "--batch-size", "4", "--limit", "8",
                      "--max-length", "1024", "--window", "64")
    assert [r.get("model") for r in rows[:2]] == ["longformer-minilm-1024", "bert-minilm-512"]
    for row in rows[:2]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["train_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert row["memory_measure"] == "process_max_rss" and row["split_sizes"]["train"] == 8
    assert rows[0]["train_truncated_fraction"] <= rows[1]["train_truncated_fraction"]
    assert set(rows[2]) == {"comparison", "test_accuracy_gain", "train_time_ratio", "peak_memory_ratio"}


@pytest.mark.slow
@pytest.mark.assets
def test_headlines_smoke():
    model, baseline, comparison = run_script(
        "headlines.py", "--epochs", "1", "--batch-size", "4", "--limit", "8", "--max-source-length", "128",
        "--max-target-length", "16", "--window", "64", "--beams", "2", "--eval-batch-size", "8")
    assert model["model"] == "led-minilm-128" and model["decoding"] == "beam 2"
    assert baseline["model"] == "first-sentence" and baseline["test_examples"] == model["test_examples"] == 8
    for row in (model, baseline):
        assert all(0.0 <= row[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert model["train_seconds"] > 0 and model["peak_memory_mb"] > 0 and len(model["samples"]) == 3
    assert baseline["rouge1"] > 0.05  # the lead sentence shares words with the headline
    assert comparison["rouge1_gain"] == pytest.approx(model["rouge1"] - baseline["rouge1"], abs=1e-3)
