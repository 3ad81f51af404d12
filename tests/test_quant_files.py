"""Quantized files end to end: `deltaformer quantize` writes them, from_pretrained reloads them packed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaformer.cli.main import main
from deltaformer.config import LlamaConfig
from deltaformer.errors import QuantError
from deltaformer.models import LlamaForCausalLM
from deltaformer.quant import files
from deltaformer.quant.layers import QuantLinear, quantize


def _tiny_llama(tmp_path, tie: bool = True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights unlike the init's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "fp32")
    return model, tmp_path / "fp32"


@pytest.mark.parametrize("scheme, extra", [("nf4", []), ("fp4", ["--no-double-quant"]), ("int8", ["--all-layers"]),
                                           ("zeropoint", ["--granularity", "group", "--group-size", "32"]),
                                           ("int4", ["--all-layers"]), ("w8a8", []),
                                           ("llm_int8", ["--skip", "lm_head", "down"])])
def test_quantize_cli_round_trips_packed(tmp_path, scheme, extra, capsys):
    model, src = _tiny_llama(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--scheme", scheme, "--out", str(out), *extra]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = files.read_metadata(out)
    assert meta["options"]["scheme"] == scheme and meta["layers"]
    loaded = LlamaForCausalLM.from_pretrained(out)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(meta["layers"]) and all(m.scheme == scheme for m in layers.values())
    assert ("lm_head" in layers) == ("--all-layers" in extra)  # the head stays fp32 unless asked
    assert ("backbone.layers.0.mlp.down" in layers) == ("down" not in extra)
    skip = tuple(extra[1:]) if extra[:1] == ["--skip"] else () if "--all-layers" in extra else None
    assert meta["options"]["skip"] == (["lm_head"] if skip is None else list(skip))
    quantize(model, scheme, skip=skip,
             double_quant="--no-double-quant" not in extra,
             granularity=extra[1] if extra[:1] == ["--granularity"] else "channel", group_size=32)
    ours = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_quantized_file_is_smaller_and_reports_scheme(tmp_path):
    _, src = _tiny_llama(tmp_path)
    assert main(["quantize", str(src), "--scheme", "nf4", "--out", str(tmp_path / "q")]) == 0
    size = (tmp_path / "q" / files.QUANT_FILE).stat().st_size
    assert size < 0.5 * (src / "model.safetensors").stat().st_size
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def _rewrite(path, change):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def test_metadata_that_does_not_match_tensors_is_a_clear_error(tmp_path):
    _, src = _tiny_llama(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--scheme", "int8", "--out", str(out)]) == 0
    file = out / files.QUANT_FILE
    good = file.read_bytes()

    def relabel(meta, tensors):  # the metadata says nf4, the tensors are int8 rows
        spec = json.loads(meta[files.META_KEY])
        spec["layers"]["backbone.layers.0.attn.query"].update(scheme="nf4", double_quant=False)
        meta[files.META_KEY] = json.dumps(spec)

    _rewrite(file, relabel)
    with pytest.raises(QuantError, match=r"tensor backbone.layers.0.attn.query.weight_q is I8 \[64, 64\] but its "
                                         r"metadata implies uint8 \[2048\]"):
        LlamaForCausalLM.from_pretrained(out)
    file.write_bytes(good)
    _rewrite(file, lambda meta, tensors: tensors.pop("backbone.layers.1.mlp.up.scale"))
    with pytest.raises(QuantError, match="lacks backbone.layers.1.mlp.up.scale"):
        LlamaForCausalLM.from_pretrained(out)
    file.write_bytes(good)
    _rewrite(file, lambda meta, tensors: meta.pop(files.META_KEY))
    with pytest.raises(QuantError, match="not written by `deltaformer quantize`"):
        LlamaForCausalLM.from_pretrained(out)
    file.write_bytes(good)

    def wrong_layer(meta, tensors):
        spec = json.loads(meta[files.META_KEY])
        spec["layers"]["backbone.layers.0.nope"] = spec["layers"]["backbone.layers.0.attn.query"]
        meta[files.META_KEY] = json.dumps(spec)

    _rewrite(file, wrong_layer)
    with pytest.raises(QuantError, match="names layer 'backbone.layers.0.nope', which this model does not have"):
        LlamaForCausalLM.from_pretrained(out)


def test_bad_requests_write_nothing(tmp_path, capsys):
    _, src = _tiny_llama(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--scheme", "int3", "--out", str(out)]) == 2
    assert "unknown quantization scheme 'int3'" in capsys.readouterr().err
    assert main(["quantize", str(src), "--scheme", "q4_1", "--out", str(out)]) == 2
    assert "add --gguf" in capsys.readouterr().err
    assert main(["quantize", str(src), "--scheme", "int8", "--granularity", "group", "--group-size", "48",
                 "--out", str(out)]) == 2
    assert "multiple of the group size" in capsys.readouterr().err
    assert main(["quantize", str(src), "--scheme", "int8", "--skip", "lm_head", "--all-layers", "--out", str(out)]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["quantize", str(src), "--scheme", "q8_0", "--gguf", "--all-layers", "--out", str(out)]) == 2
    assert "do not apply to --gguf" in capsys.readouterr().err
    assert not out.exists()
    assert main(["quantize", str(src), "--scheme", "int8", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["quantize", str(src), "--scheme", "nf4", "--blocksize", "0", "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier files are untouched
    with pytest.raises(QuantError, match="no quantized layers"):
        files.save_quantized(LlamaForCausalLM.from_pretrained(src), tmp_path / "plain")


@pytest.mark.parametrize("scheme, atol", [("q8_0", 0.02), ("q4_1", 0.2)])
def test_gguf_export_reads_back_in_transformers_with_the_same_weights(tmp_path, scheme, atol):
    transformers = pytest.importorskip("transformers")
    model, src = _tiny_llama(tmp_path, tie=False)
    out = tmp_path / "g"
    assert main(["quantize", str(src), "--scheme", scheme, "--gguf", "--out", str(out)]) == 0
    name = f"model-{scheme.upper()}.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=name).eval()
    ours = LlamaForCausalLM.from_pretrained(out / name)  # our GGUF reader dequantizes the same blocks
    theirs = hf.state_dict()
    mine = ours.hf_state_dict()
    assert set(mine) <= set(theirs)
    for key, tensor in mine.items():
        assert torch.equal(theirs[key], tensor), key  # the same dequantized weights, bit for bit
    original = model.hf_state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < (mine[q] - original[q]).abs().max() <= atol  # quantized, not copied


@pytest.mark.parametrize("scheme", ["int8", "int4", "zeropoint", "nf4"])
def test_tied_embedding_reads_the_quantized_head(tmp_path, scheme):
    from deltaformer.quant.layers import QuantEmbedding

    model, src = _tiny_llama(tmp_path)
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--scheme", scheme, "--embeddings", "--out", str(out)]) == 0
    loaded = LlamaForCausalLM.from_pretrained(out)
    emb = loaded.backbone.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.head is loaded.lm_head
    assert not any("tokens" in k for k in loaded.state_dict())  # the table is stored once, as the head
    ids = torch.tensor([[0, 5, 95, 5], [64, 63, 1, 2]])
    table = loaded.lm_head.dequantize()
    assert torch.equal(emb(ids), table[ids])
    quantize(model, scheme, embeddings=True)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
