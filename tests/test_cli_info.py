"""``deltaformer info`` and the dispatcher's one-line errors."""

from __future__ import annotations

import json

import pytest

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


def _tiny_gguf(tmp_path, tensor_type):
    from deltaformer.checkpoints.gguf_writer import save_gguf
    from deltaformer.config import LlamaConfig
    from deltaformer.models import LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return save_gguf(LlamaForCausalLM(config), tmp_path / "tiny.gguf", tensor_type)


def test_info_shows_the_quantization_types_of_a_gguf_file(tmp_path, capsys):
    path = _tiny_gguf(tmp_path, "Q8_0")
    assert main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 7 matrices per layer and the tied token table in Q8_0; 2 norms per layer and the final norm in F32
    assert report["gguf"]["tensors"] == {"Q8_0": 2 * 7 + 1, "F32": 2 * 2 + 1}
    assert sum(report["gguf"]["weights"].values()) == report["parameters"]
    assert report["gguf"]["weights"]["F32"] == 5 * 64
    assert main(["info", str(path)]) == 0
    assert "GGUF tiny.gguf: tensors 15 Q8_0, 5 F32" in capsys.readouterr().out
    assert main(["info", str(path.parent), "--json"]) == 0  # the folder holding it
    assert json.loads(capsys.readouterr().out)["gguf"]["tensors"]["Q8_0"] == 15


@pytest.mark.assets
def test_info_smollm2(capsys):
    assert main(["info", "smollm2-135m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "LlamaForCausalLM" and report["parameters"] == 134_515_008
    assert report["gguf"]["tensors"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "134.5M parameters" in out and "tensors 210 Q4_1, 61 F32, 1 Q8_0" in out
