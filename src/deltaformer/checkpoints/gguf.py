"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: config, HF-named tensors, tokenizer.

A GGUF file carries its config and tokenizer as metadata under llama.cpp's key names and its tensors under
llama.cpp's names, shapes in reverse order and, for Llama's query and key projections, rows permuted for
llama.cpp's rotary layout. :class:`GGUFCheckpoint` undoes all three so the rest of deltaformer sees what a
``transformers`` checkpoint directory would hold: ``hf_config()`` is a ``config.json`` dict and
``hf_tensors()`` yields ``model.layers.0.self_attn.q_proj.weight``-style fp32 tensors one at a time, so
loading never holds a second copy of the model. The file is memory-mapped by ``gguf.GGUFReader``; a tensor's
bytes are read only when it is dequantized.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from torch import Tensor

from ..errors import CheckpointError
from ..quant.gguf_blocks import dequantize

#: Architectures whose tensors and metadata this module maps, with the HF model class they become.
ARCHITECTURES = {"llama": "LlamaForCausalLM"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
#: Tensors llama.cpp derives for its own kernels that a HF model computes itself.
_DERIVED = {"rope_freqs.weight"}


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: its packed bytes (a view into the memory-mapped file), type and torch shape."""

    name: str
    data: np.ndarray
    type: GGMLQuantizationType
    shape: tuple[int, ...]


class GGUFCheckpoint:
    """One GGUF file, read lazily; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on bad files
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({first}): it is truncated or "
                                  "corrupt; download it again") from None
        self.metadata = {name: _value(field) for name, field in self._reader.fields.items()
                         if not name.startswith("GGUF.")}
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"{self.path} holds a {self.architecture or 'unnamed'!r} model; deltaformer reads "
                                  f"GGUF files of {', '.join(ARCHITECTURES)} architecture")
        self._tensors = {t.name: t for t in self._reader.tensors}

    # --- config -----------------------------------------------------------------------------------

    def _key(self, name: str, default: Any = None) -> Any:
        value = self.metadata.get(f"{self.architecture}.{name}", default)
        if value is None:
            raise CheckpointError(f"{self.path} lacks metadata {self.architecture}.{name}: the file is incomplete")
        return value

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` a ``transformers`` checkpoint of this model would carry."""
        heads = int(self._key("attention.head_count"))
        hidden = int(self._key("embedding_length"))
        head_dim = int(self.metadata.get(f"{self.architecture}.attention.key_length", hidden // heads))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        config: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [ARCHITECTURES[self.architecture]],
            "vocab_size": int(self.metadata.get(f"{self.architecture}.vocab_size") or len(tokens or ())),
            "hidden_size": hidden,
            "intermediate_size": int(self._key("feed_forward_length")),
            "num_hidden_layers": int(self._key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._key("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self._key("context_length")),
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": "blk.0.ffn_up.bias" in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
        }
        scaling = self._rope_scaling()
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self.metadata.get(f"{self.architecture}.rope.scaling.type")
        factor = self.metadata.get(f"{self.architecture}.rope.scaling.factor")
        if kind in (None, "none") or not factor:
            return None
        if kind != "linear":
            raise CheckpointError(f"{self.path} uses RoPE scaling {kind!r}, which deltaformer does not map from "
                                  "GGUF (linear only); load the transformers checkpoint instead")
        return {"rope_type": "linear", "factor": float(factor)}

    # --- tensors ----------------------------------------------------------------------------------

    def tensor_types(self) -> dict[str, str]:
        """Each stored tensor's GGML type name, by GGUF tensor name."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def raw(self, name: str) -> RawTensor:
        """A tensor's packed bytes, type and (torch-order) shape, by GGUF name, without dequantizing it."""
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        t = self._tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        return RawTensor(name, t.data, GGMLQuantizationType(int(t.tensor_type)), shape)

    def hf_name(self, name: str) -> str | None:
        """The HF name of GGUF tensor ``name`` (None for tensors a HF model derives itself)."""
        if name in _DERIVED:
            return None
        match = _BLOCK.match(name)
        if match:
            layer, part, kind = match.groups()
            if part not in _LAYER_NAMES:
                raise CheckpointError(f"{self.path} has tensor {name} that a {self.architecture} model does not have")
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
        stem, _, kind = name.rpartition(".")
        if stem not in _TOP_NAMES:
            raise CheckpointError(f"{self.path} has tensor {name} that a {self.architecture} model does not have")
        return f"{_TOP_NAMES[stem]}.{kind}"

    def hf_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(hf_name, fp32 tensor)`` pairs, one at a time, query/key rows back in HF's rotary layout."""
        config = self.hf_config()
        for name in self._tensors:
            hf = self.hf_name(name)
            if hf is None:
                continue
            raw = self.raw(name)
            tensor = dequantize(raw.data, raw.type, raw.shape)
            if ".attn_q." in name:
                tensor = unpermute_rotary(tensor, config["num_attention_heads"])
            elif ".attn_k." in name:
                tensor = unpermute_rotary(tensor, config["num_key_value_heads"])
            yield hf, tensor

    # --- tokenizer --------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return str(template) if template else None


def unpermute_rotary(weight: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's row order for rotary projections: per head, interleaved pairs back to two halves.

    llama.cpp stores ``w.reshape(heads, 2, d // 2, ...).swapaxes(1, 2)``; this is the inverse, the same as
    ``transformers``' GGUF loader applies.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rotary(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's row order for a HF rotary projection (the inverse of :func:`unpermute_rotary`)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """A :class:`GGUFCheckpoint`, shared while the file is unchanged: parsing the metadata of a large vocabulary
    takes seconds, and the tokenizer and the model of one file read it once."""
    path = Path(path).resolve()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, mtime_ns: int, size: int) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` in a directory without config.json."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise CheckpointError(f"{path} holds {len(files)} GGUF files: pass the one to load")
        return files[0] if files else None
    return None


def _value(field: Any) -> Any:
    """A metadata field as a Python value (strings decoded, arrays as lists)."""
    try:
        return field.contents()
    except Exception as exc:  # a field whose bytes are cut short
        raise CheckpointError(f"GGUF metadata field {field.name} cannot be read ({exc}): the file is corrupt") from None
