"""``deltaformer info`` and the dispatcher's one-line errors."""

from __future__ import annotations

import json

from deltaformer.cli.main import main

from .conftest import make_hf_bert


def test_info_counts_match_the_model(tmp_path, capsys):
    hf, path = make_hf_bert(tmp_path, "BertForSequenceClassification", num_labels=3)
    assert main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "BertForSequenceClassification"
    assert report["parameters"] == sum(p.numel() for p in hf.parameters())
    assert report["trainable"] == report["parameters"]
    assert sum(part["total"] for part in report["parts"].values()) == report["parameters"]
    assert report["analytic_VH_plus_12LH2"] == 99 * 32 + 2 * 12 * 32 * 32
    assert report["bytes_on_disk"] > 0


def test_info_table(tmp_path, capsys):
    _, path = make_hf_bert(tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "BertModel" in out and "analytic" in out and "leaves out" in out


def test_bad_model_is_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bort"}')
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model_type 'bort'" in err


def test_info_summarises_attached_deltas(tmp_path, capsys):
    """``--delta DIR`` attaches saved deltas; the summary counts them per method and module type."""
    from deltaformer import delta
    from deltaformer.models import BertModel

    _, path = make_hf_bert(tmp_path)
    model = BertModel.from_pretrained(path)
    delta.attach(model, delta.LoraConfig(r=4, targets=("query", "value")), "sst")
    delta.save_delta(model, tmp_path / "sst", "sst")
    delta.attach(model, delta.BitFitConfig(), "bias")
    delta.save_delta(model, tmp_path / "bias", "bias")
    assert main(["info", str(path), "--delta", str(tmp_path / "sst"), "--delta", str(tmp_path / "bias"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["deltas"]
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))  # before BitFit wraps them
    lora = layers * 2 * (4 * hidden + hidden * 4)
    assert summary["methods"]["lora"] == {**summary["methods"]["lora"], "params": lora, "deltas": ["sst"]}
    assert summary["methods"]["bitfit"]["params"] == biases
    assert summary["trainable"] == lora + summary["methods"]["bitfit"]["params"]
    assert summary["modules"]["attn.query"] == summary["modules"]["attn.value"]
    assert main(["info", str(path), "--delta", str(tmp_path / "sst")]) == 0
    assert "lora" in capsys.readouterr().out
