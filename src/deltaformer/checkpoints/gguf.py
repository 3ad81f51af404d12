"""GGUF checkpoints (llama.cpp's single-file format), read and written with the ``gguf`` package.

A GGUF file holds its config and tokenizer as metadata and its weights as packed blocks under llama.cpp's
names, with the query and key rows of each head interleaved for llama.cpp's rotary layout. The reader turns
them into what the rest of deltaformer reads from a Hugging Face directory: an HF ``config.json`` dict, HF
tensor names with Q/K rows back in HF order, fp32 weights (dequantized in torch by
:mod:`deltaformer.quant.gguf_blocks`), and a tokenizer built over ``tokenizers``. Tensors come one at a time
from a memory map, so loading never holds more than the model plus one tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..quant.gguf_blocks import BLOCK_SIZES, GGUFTypeError, check_type, dequantize, quantize, type_name
from .io import atomic_write

if TYPE_CHECKING:
    from ..tokenizer import AutoTokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
WRITABLE_TYPES = ("F32", "F16", "Q8_0", "Q4_1")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
#: tensors llama.cpp derives or stores for itself; the HF model computes them from the config
_SKIPPED = ("rope_freqs.weight",)
# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None for tensors HF derives itself)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_name(name: str) -> str | None:
    """The llama.cpp name of a Hugging Face tensor name."""
    for g, h in _GLOBAL_NAMES.items():
        if name == h:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary row order -> HF's: per head, rows (pair, half) become (half, pair)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary row order -> llama.cpp's (the inverse of :func:`unpermute`)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: packed bytes (uint8, one row of blocks per weight row), type name, PyTorch shape."""

    data: np.ndarray
    type: str
    shape: tuple[int, ...]


class GGUFCheckpoint:
    """A GGUF file opened for reading (memory-mapped; nothing is dequantized until asked)."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist: check the path")
        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as exc:  # the reader fails with struct, value and index errors alike
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:160]}): it is truncated or corrupted; "
                                  "re-download it") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if not key.startswith("GGUF."):
                self.metadata[key] = field.contents()
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{self.path} holds a GGUF model of architecture {self.architecture or '(none)'!r}, "
                                  f"which deltaformer does not load (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._tensors = {t.name: t for t in self._reader.tensors}
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            kind = type_name(t.tensor_type)
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name} ends at byte {end:,} but the file "
                                      f"has {size:,}; re-download it")
            if kind not in BLOCK_SIZES:
                check_type(kind)  # a clear error naming the type, before any weight is loaded
        self._config = self._hf_config()

    # ---- config ------------------------------------------------------------------------------------------

    def _key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def _hf_config(self) -> dict[str, Any]:
        def need(name: str) -> Any:
            value = self._key(name)
            if value is None:
                raise CheckpointError(f"{self.path} lacks the metadata key {self.architecture}.{name}: "
                                      "it is not a complete GGUF model; re-convert it")
            return value

        heads = int(need("attention.head_count"))
        if self._key("expert_count"):
            raise CheckpointError(f"{self.path} is a mixture-of-experts Llama, which deltaformer does not load")
        vocab = self._key("vocab_size") or len(self.metadata.get("tokenizer.ggml.tokens") or ()) or None
        if vocab is None and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        config: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": int(need("block_count")),
            "max_position_embeddings": int(need("context_length")),
            "hidden_size": int(need("embedding_length")),
            "intermediate_size": int(need("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._key("attention.head_count_kv", heads)),
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
            "vocab_size": int(vocab) if vocab else None,
            "head_dim": int(self._key("attention.key_length") or self._key("rope.dimension_count")
                            or int(need("embedding_length")) // heads),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": "blk.0.ffn_up.bias" in self._tensors,
        }
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
            value = self.metadata.get(f"tokenizer.ggml.{key}")
            if value is not None:
                config[hf] = int(value)
        scaling = self._key("rope.scaling.type")
        if scaling and scaling != "none":
            if scaling != "linear":
                raise CheckpointError(f"{self.path} uses RoPE scaling {scaling!r}, which this reader does not map; "
                                      "supported: linear")
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(self._key("rope.scaling.factor"))}
        return config

    def hf_config(self) -> dict[str, Any]:
        """The model's Hugging Face ``config.json`` as a dict."""
        return dict(self._config)

    # ---- tensors -----------------------------------------------------------------------------------------

    def tensor_types(self) -> dict[str, str]:
        """HF tensor name -> GGUF type name (e.g. ``"Q4_1"``)."""
        return {hf_name(n) or n: type_name(t.tensor_type) for n, t in self._tensors.items() if n not in _SKIPPED}

    def raw(self, name: str) -> RawTensor:
        """A tensor's packed bytes as stored (HF or GGUF name), its type and PyTorch-order shape.

        Q/K rows stay in llama.cpp's order: packed layers that compute from the blocks permute their outputs.
        """
        key = name if name in self._tensors else gguf_name(name)
        if key is None or key not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        t = self._tensors[key]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        return RawTensor(np.asarray(t.data).view(np.uint8), type_name(t.tensor_type), shape)

    def hf_tensors(self, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, fp32 tensor) one at a time, Q/K rows in HF order; unknown names are an error."""
        heads = self._config["num_attention_heads"]
        kv_heads = self._config["num_key_value_heads"]
        for name in self._tensors:
            if name in _SKIPPED:
                continue
            hf = hf_name(name)
            if hf is None:
                raise CheckpointError(f"{self.path} holds tensor {name!r}, which a Llama model does not have: "
                                      "is the file's architecture metadata right?")
            raw = self.raw(name)
            tensor = dequantize(np.array(raw.data), raw.type, raw.shape, device=device)
            if ".self_attn.q_proj." in hf:
                tensor = unpermute(tensor, heads)
            elif ".self_attn.k_proj." in hf:
                tensor = unpermute(tensor, kv_heads)
            yield hf, tensor

    # ---- tokenizer ---------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer(self) -> AutoTokenizer:
        """The file's tokenizer (vocabulary, merges, special tokens and chat template from its metadata)."""
        from ..tokenizer import AutoTokenizer

        return AutoTokenizer.from_gguf_metadata(self.metadata, source=str(self.path))


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` in a directory without config.json."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise CheckpointError(f"{path} holds {len(files)} GGUF files: pass the one to load")
        return files[0] if files else None
    return None


# ---- writing -----------------------------------------------------------------------------------------------


def save_gguf(model: Any, path: str | Path, tensor_type: str = "F32", tokenizer: Any = None) -> Path:
    """Write a Llama model (and its byte-level BPE tokenizer, when given) as a GGUF file llama.cpp reads.

    Matrices are stored as ``tensor_type`` (F32, F16, Q8_0 or Q4_1); norms and biases stay F32, as llama.cpp
    writes them. Q/K rows are permuted to llama.cpp's rotary layout. The write is atomic.
    """
    import gguf

    kind = type_name(tensor_type)
    if kind not in WRITABLE_TYPES:
        raise GGUFTypeError(f"save_gguf writes {', '.join(WRITABLE_TYPES)}, not {kind}")
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise CheckpointError(f"save_gguf writes Llama models; got a {type(model).__name__}")
    path = Path(path)
    arch = "llama"
    state = model.hf_state_dict()
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise CheckpointError("the model has an untied head but no lm_head.weight to write")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(str(config.extra.get("_name_or_path") or "deltaformer-llama"))
        writer.add_block_count(config.num_hidden_layers)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        scaling = config.rope_scaling
        if scaling:
            if scaling.get("rope_type", scaling.get("type")) != "linear":
                raise CheckpointError(f"save_gguf maps linear RoPE scaling only, not {scaling}")
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        if tokenizer is not None:
            _write_tokenizer(writer, tokenizer, config)
        else:
            for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id),
                               ("pad", config.pad_token_id)):
                if isinstance(value, int):
                    getattr(writer, f"add_{key}_token_id")(value)
        for name, tensor in state.items():
            g = gguf_name(name)
            if g is None:
                raise CheckpointError(f"save_gguf has no llama.cpp name for {name}")
            t = tensor.detach().float().cpu()
            if ".self_attn.q_proj." in name:
                t = permute(t, config.num_attention_heads)
            elif ".self_attn.k_proj." in name:
                t = permute(t, config.num_key_value_heads)
            this = kind if t.dim() == 2 else "F32"
            if this not in ("F32", "F16") and t.shape[-1] % BLOCK_SIZES[this][0]:
                this = "F16"  # rows that do not fill whole blocks, as llama.cpp falls back
            qtype = gguf.GGMLQuantizationType[this]
            data = np.frombuffer(quantize(t, this), dtype=np.uint8)
            if this == "F32":
                writer.add_tensor(g, data.view(np.float32).reshape(t.shape))
            elif this == "F16":
                writer.add_tensor(g, data.view(np.float16).reshape(t.shape))
            else:
                nbytes = t.shape[-1] // BLOCK_SIZES[this][0] * BLOCK_SIZES[this][1]
                writer.add_tensor(g, data.reshape(*t.shape[:-1], nbytes), raw_dtype=qtype)
        writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_1": 3}[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return path


def _write_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer metadata."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"save_gguf writes byte-level BPE tokenizers only, not {model.get('type')}")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [(_CONTROL if added[i]["special"] else _USER_DEFINED) if i in added else _NORMAL
             for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id" if kind != "unk" else "add_unk_token_id")(token_id)
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
