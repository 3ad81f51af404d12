"""BERT -> Longformer conversion: loads in transformers with our outputs, and is the BERT where the window covers."""

from __future__ import annotations

import json

import pytest
import torch

from deltaformer.cli.main import main
from deltaformer.convert import convert_bert_to_longformer
from deltaformer.errors import ConfigError
from deltaformer.models import BertForSequenceClassification, BertModel
from deltaformer.models.longformer import LongformerForSequenceClassification, LongformerModel

from .conftest import make_hf_bert

ATOL = 1e-5


def _long_inputs(batch=2, seq=150, vocab=99):
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, seq - 40:] = 0
    ids[mask == 0] = 0  # BERT's [PAD]
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    return ids, mask, glob


def test_converted_bert_loads_in_transformers_with_our_outputs(tmp_path):
    import transformers

    _, path = make_hf_bert(tmp_path / "bert")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    out = convert_bert_to_longformer(path, max_length=200, window=8, out_dir=tmp_path / "long")
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 200
    ours = LongformerModel.from_pretrained(out)
    assert ours.config.max_position_embeddings == 201 and ours.config.attention_window == 16
    hf = transformers.LongformerModel.from_pretrained(out).eval()
    ids, mask, glob = _long_inputs()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, global_attention_mask=glob)
        got = ours(ids, mask, glob)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)


def test_window_covering_the_input_reproduces_the_bert(tmp_path):
    """Positions tile BERT's and global projections copy the local ones: a short input gives BERT's outputs."""
    _, path = make_hf_bert(tmp_path / "bert")
    out = convert_bert_to_longformer(path, max_length=300, window=64, out_dir=tmp_path / "long")
    bert, long = BertModel.from_pretrained(path), LongformerModel.from_pretrained(out)
    ids, mask, glob = _long_inputs(seq=40)
    with torch.no_grad():
        expected = bert(ids, mask).last_hidden_state
        for global_mask in (None, glob):
            got = long(ids, mask, global_mask).last_hidden_state
            real = mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    table = long.embeddings.positions.weight
    torch.testing.assert_close(table[1 + 64 + 5], bert.embeddings.positions.weight[5])  # tiled every 64 rows


def test_classifier_keeps_its_head(tmp_path):
    import transformers

    _, path = make_hf_bert(tmp_path / "bert", "BertForSequenceClassification", num_labels=3)
    out = convert_bert_to_longformer(path, max_length=128, window=32, out_dir=tmp_path / "long")
    bert = BertForSequenceClassification.from_pretrained(path)
    long = LongformerForSequenceClassification.from_pretrained(out)
    hf = transformers.LongformerForSequenceClassification.from_pretrained(out).eval()
    ids, mask, _ = _long_inputs(seq=30)
    with torch.no_grad():
        got = long(ids, mask).logits
        torch.testing.assert_close(got, bert(ids, mask).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(got, hf(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_cli_and_errors(tmp_path, capsys):
    _, path = make_hf_bert(tmp_path / "bert")
    assert main(["convert-long", str(path), "--max-length", "100", "--window", "4", "--out",
                 str(tmp_path / "long")]) == 0
    assert "window 4 per side" in capsys.readouterr().out
    assert (tmp_path / "long" / "model.safetensors").is_file()
    assert main(["convert-long", str(tmp_path / "long"), "--max-length", "100", "--out", str(tmp_path / "x")]) == 2
    assert "converts BERT checkpoints" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be positive"):
        convert_bert_to_longformer(path, max_length=0, window=4, out_dir=tmp_path / "y")


@pytest.mark.assets
def test_minilm_converts_and_matches_transformers(tmp_path):
    import transformers

    from deltaformer.data.assets import fetch

    out = convert_bert_to_longformer(fetch("minilm"), max_length=1024, window=64, out_dir=tmp_path / "long")
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    ours = LongformerModel.from_pretrained(out)
    hf = transformers.LongformerModel.from_pretrained(out).eval()
    ids = torch.randint(1000, 30000, (1, 700))
    glob = torch.zeros_like(ids)
    glob[0, 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, global_attention_mask=glob).last_hidden_state,
                                   hf(ids, global_attention_mask=glob).last_hidden_state, atol=ATOL, rtol=0)
