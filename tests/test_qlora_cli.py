"""``deltaformer finetune --method qlora`` and ``--quantize`` for other methods, end to end: the run trains on a
quantized base, records the scheme, and reloads (evaluate, predict) on the same quantized base."""

from __future__ import annotations

import json

import pytest

from deltaformer.cli.main import main
from deltaformer.delta.wrappers import DeltaQuantLinear
from deltaformer.quant.base import QuantizedLinear
from deltaformer.train.runs import load_run

from .test_cli_finetune import WORDS, write_csv


def make_base(directory):
    """A random 2-layer HF BERT 64 wide (whole 4-bit blocks) with a WordPiece vocabulary of the test words."""
    import torch
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "."]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcli")
    base = make_base(root / "base")
    write_csv(root / "train.csv", 96, seed=1)
    write_csv(root / "test.csv", 24, seed=2)
    return root, base


def finetune(root, base, out, method, *extra):
    return main(["finetune", str(base), "--train", str(root / "train.csv"), "--test", str(root / "test.csv"),
                 "--text-field", "review", "--label-field", "sentiment", "--method", method, "--epochs", "6",
                 "--batch-size", "8", "--lr", "3e-3", "--warmup-ratio", "0", "--no-progress", "--out", str(out),
                 *extra])


@pytest.fixture(scope="module")
def qlora_run(workspace):
    root, base = workspace
    out = root / "qlora-run"
    assert finetune(root, base, out, "qlora") == 0
    return out


def quantized_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear | DeltaQuantLinear)]


@pytest.mark.parametrize(("method", "quantize", "scheme"), [
    ("qlora", None, "nf4"), ("lora", "int8", "int8"), ("ia3", "llm.int8", "llm_int8"), ("prefix", "nf4", "nf4"),
    ("bitfit", "q4_1", "q4_1")])
def test_finetune_on_a_quantized_base_saves_a_delta_that_reloads_and_predicts(workspace, capsys, request, method,
                                                                                   quantize, scheme):
    root, base = workspace
    if method == "qlora":  # the recipe is trained to accuracy (once, shared with the merge tests)
        out = request.getfixturevalue("qlora_run")
    else:
        out = root / f"{method}-{quantize}"
        assert finetune(root, base, out, method, "--quantize", quantize, "--max-steps", "4") == 0
    capsys.readouterr()
    info = json.loads((out / "run.json").read_text())
    assert info["method_options"]["quantize"] == (quantize or "nf4")
    results = json.loads((out / "results.json").read_text())
    assert results["quantize"] == (quantize or "nf4")
    assert results["trainable_percent"] < 30
    if method == "qlora":  # the recipe: LoRA on every linear layer but the head, NF4 with double quantization
        assert info["method_options"]["targets"] == ["all-linear"]
        assert results["test"]["accuracy"] >= 0.75, results["test"]
    loaded = load_run(out)
    layers = quantized_layers(loaded.model)
    assert len(layers) == 13 and {m.scheme for m in layers} == {scheme}  # 2 x 6 + the pooler; the head stays fp32
    if method == "qlora":
        assert all(isinstance(m, DeltaQuantLinear) for m in layers)
        assert all(m.quantized.scale_codes is not None for m in layers)  # double quantization
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test"]["accuracy"]
    assert main(["predict", str(out), "the film was superb", "awful and dull plot"]) == 0
    labels = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert len(labels) == 2 and set(labels) <= {"pos", "neg"}


def test_quantize_flag_errors_are_one_line(workspace, capsys):
    root, base = workspace
    assert finetune(root, base, root / "full-q", "full", "--quantize", "nf4", "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized base is frozen" in err
    with pytest.raises(SystemExit):
        finetune(root, base, root / "bad-q", "lora", "--quantize", "int3")
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert not (root / "full-q").exists()


def test_merging_a_qlora_run_reports_the_price_and_saves_the_exact_merge(workspace, qlora_run, capsys):
    import torch

    from deltaformer.models import BertForSequenceClassification

    root, _ = workspace
    capsys.readouterr()
    assert main(["merge", str(qlora_run), "--out", str(root / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "into a nf4 base" in printed and "backbone.layers.0.attn.query" in printed and "logits change" in printed
    report = json.loads((root / "merged" / "merge_report.json").read_text())
    assert report["scheme"] == "nf4" and len(report["layers"]) == 13  # every linear but the head carries LoRA
    # this toy run's updates are as large as its random weights, so quantizing them again costs a lot (0.1-0.4)
    assert all(0 < layer["relative_error"] < 1 for layer in report["layers"]), report["layers"]
    assert report["outputs"]["examples"] == 24 and 0 < report["outputs"]["logits_relative_change"] < 2
    loaded = load_run(qlora_run)
    merged = BertForSequenceClassification.from_pretrained(root / "merged").eval()
    ids = loaded.tokenizer(["the film was superb", "awful and dull plot"], return_tensors="pt", padding=True)
    batch = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():  # merged into the dequantized weights: what the run computes, up to fp32 rounding
        torch.testing.assert_close(merged(**batch).logits, loaded.model(**batch).logits, atol=1e-4, rtol=0)


def test_packed_merge_saves_the_quantized_again_model_that_reloads_packed(workspace, qlora_run, capsys):
    import torch

    from deltaformer.models import BertForSequenceClassification
    from deltaformer.quant.layers import QuantLinear

    root, _ = workspace
    assert main(["merge", str(qlora_run), "--out", str(root / "merged-packed"), "--packed"]) == 0
    capsys.readouterr()
    assert (root / "merged-packed" / "quantized.safetensors").is_file()
    assert (root / "merged-packed" / "merge_report.json").is_file()
    packed = BertForSequenceClassification.from_pretrained(root / "merged-packed").eval()
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 13 and {m.scheme for m in layers} == {"nf4"}
    loaded = load_run(qlora_run)
    ids = loaded.tokenizer(["the film was superb", "awful and dull plot"], return_tensors="pt", padding=True)
    batch = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        want, got = loaded.model(**batch).logits, packed(**batch).logits
    change = ((got - want).norm() / want.norm()).item()  # the price of quantizing the merge again: as reported
    reported = json.loads((root / "merged-packed" / "merge_report.json").read_text())["outputs"]
    assert 0 < change < 2 and reported["logits_relative_change"] > 0


def test_merging_into_another_scheme_is_refused_and_writes_nothing(workspace, qlora_run, capsys):
    root, _ = workspace
    capsys.readouterr()
    assert main(["merge", str(qlora_run), "--out", str(root / "merged-int8"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on a nf4 base" in err and "int8" in err
    assert not (root / "merged-int8").exists()


def test_merging_an_fp32_run_reports_what_quantizing_it_costs(workspace, capsys):
    root, base = workspace
    out = root / "lora-fp32"
    assert finetune(root, base, out, "lora", "--max-steps", "2") == 0
    assert main(["merge", str(out), "--out", str(root / "merged-fp32"), "--quantize", "nf4"]) == 0
    report = json.loads((root / "merged-fp32" / "merge_report.json").read_text())
    assert report["scheme"] == "nf4" and len(report["layers"]) == 13
    assert report["outputs"]["examples"] == 24


@pytest.mark.slow
@pytest.mark.assets
def test_qlora_on_minilm_rt_polarity_learns_and_reloads(tmp_path, capsys):
    out = tmp_path / "qlora"
    assert main(["finetune", "minilm", "--task", "rt-polarity", "--method", "qlora", "--limit", "600", "--epochs", "2",
                 "--batch-size", "16", "--max-length", "48", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["accuracy"] >= 0.65, results["test"]  # chance is 0.5; 0.77 measured at these settings
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == results["test"]["accuracy"]
