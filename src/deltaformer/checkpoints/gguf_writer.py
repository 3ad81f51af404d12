"""Writing a deltaformer Llama as a GGUF file (through ``gguf.GGUFWriter``) that llama.cpp and our reader load.

The inverse of :mod:`deltaformer.checkpoints.gguf`: HF names become llama.cpp's, query/key rows are permuted
to llama.cpp's rotary layout, shapes are reversed by the writer, and the 2-D weights are packed in the
chosen type by ``gguf.quants`` (norms and biases stay F32, as llama.cpp keeps them). A byte-level BPE
tokenizer and its chat template go into the metadata. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, RopeScalingType, quants
from torch import Tensor, nn

from ..errors import CheckpointError
from .gguf import permute_rotary
from .io import atomic_write

log = logging.getLogger("deltaformer")

#: Tensor types :func:`save_gguf` writes.
WRITE_TYPES = ("F32", "F16", "Q8_0", "Q4_1")
_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TO_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for HF tensor ``hf_name`` of a Llama."""
    stem, _, kind = hf_name.rpartition(".")
    if stem in _TO_GGUF_TOP:
        return f"{_TO_GGUF_TOP[stem]}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _TO_GGUF_LAYER:
        return f"blk.{parts[2]}.{_TO_GGUF_LAYER[parts[3]]}.{kind}"
    raise CheckpointError(f"no GGUF name for weight {hf_name}: save_gguf writes Llama models")


def save_gguf(model: Any, path: str | Path, tensor_type: str = "F16", tokenizer: Any = None) -> Path:
    """Write ``model`` (a Llama model of deltaformer; merge deltas first) to ``path`` in ``tensor_type``.

    Quantized and packed layers are written from their dequantized weights; a packed GGUF layer already in
    ``tensor_type`` is written as its own bytes (a packed load saved again is the same file's tensors)."""
    if tensor_type not in WRITE_TYPES:
        raise CheckpointError(f"tensor_type {tensor_type!r} cannot be written: use one of {', '.join(WRITE_TYPES)}")
    config = model.config
    if config.model_type != "llama":
        raise CheckpointError(f"save_gguf writes Llama models, not {config.model_type!r}")
    path = Path(path)
    qtype = GGMLQuantizationType[tensor_type]

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, "llama")
        _write_config(writer, config)
        if tokenizer is not None:
            _write_tokenizer(writer, tokenizer)
        for hf, tensor in _hf_weights(model).items():
            if hf.endswith("lm_head.weight") and config.tie_word_embeddings:
                continue
            name = gguf_name(hf)
            heads = (config.num_attention_heads if ".attn_q." in name
                     else config.num_key_value_heads if ".attn_k." in name else None)
            layer: Any = tensor if isinstance(tensor, nn.Module) else None
            if layer is not None and getattr(layer, "qtype", None) == qtype:  # packed in this type: its own bytes
                rows = (layer.packed_rows if hasattr(layer, "packed_rows") else layer.packed).cpu()
                rows = rows if heads is None else permute_rotary(rows, heads).contiguous()
                writer.add_tensor(name, rows.numpy(), raw_dtype=qtype)
                continue
            weight = (layer.dequantize() if layer is not None else cast(Tensor, tensor)).detach().float().cpu()
            if heads is not None:
                weight = permute_rotary(weight, heads)
            data, kind = _pack(name, weight.numpy(), qtype)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return path


def _hf_weights(model: Any) -> dict[str, Tensor | nn.Module]:
    """The model's weights by HF name; a packed layer (anything with ``dequantize()``: a quantized linear, a
    packed GGUF layer) stands for its ``.weight`` in place of its buffers."""
    state: dict[str, Tensor | nn.Module] = dict(model.hf_state_dict())
    name_map = model.name_map()
    for path, module in model.named_modules():
        if not path or not callable(getattr(module, "dequantize", None)):
            continue
        hf = name_map.to_hf(f"{path}.weight")
        if hf is None:
            raise CheckpointError(f"no HF name for the packed layer {path}")
        prefix = hf[: -len("weight")]
        state = {k: v for k, v in state.items() if not k.startswith(prefix) or k == prefix + "bias"}
        state[hf] = module
    return state


def _pack(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's bytes in ``qtype``; vectors (norms, biases) and rows not a whole number of blocks in F32."""
    block = GGML_QUANT_SIZES[qtype][0]
    if array.ndim < 2 or qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32), GGMLQuantizationType.F32
    if array.shape[-1] % block:
        log.warning("GGUF: %s has rows of %d, not a multiple of %s's block of %d: written as F16",
                    name, array.shape[-1], qtype.name, block)
        qtype = GGMLQuantizationType.F16
    return quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def _write_config(writer: GGUFWriter, config: Any) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise CheckpointError(f"RoPE scaling {kind!r} has no GGUF form that deltaformer writes (linear only)")
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    for role, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(config, role)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            add(int(value))


def _write_tokenizer(writer: GGUFWriter, tokenizer: Any) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise CheckpointError("save_gguf writes byte-level BPE tokenizers; this one is "
                              f"{model.get('type')}: save the model without tokenizer=")
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise CheckpointError("the tokenizer's ids are not 0..n-1 without gaps, which GGUF's token list needs")
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    types = [1] * len(tokens)
    for i, token in added.items():
        types[i] = 3 if token.special else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)


__all__ = ["WRITE_TYPES", "gguf_name", "save_gguf"]
