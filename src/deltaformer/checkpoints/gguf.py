"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: config, HF-named tensors, tokenizer.

A GGUF file carries its config and tokenizer as metadata under llama.cpp's key names and its tensors under
llama.cpp's names, shapes in reverse order and, for Llama's query and key projections, rows permuted for
llama.cpp's rotary layout. :class:`GGUFCheckpoint` undoes all three so the rest of deltaformer sees what a
``transformers`` checkpoint directory would hold: ``hf_config()`` is a ``config.json`` dict and
``hf_tensors()`` yields ``model.layers.0.self_attn.q_proj.weight``-style fp32 tensors one at a time.

The header (metadata and tensor directory) is parsed here with ``struct`` in one pass (``gguf.GGUFReader``
builds a numpy view per vocabulary entry: 40x our time and ~160 MiB for a 49k vocabulary; the tests check both
parsers agree). Tensor bytes are read with ``readinto`` into a buffer of ours when a tensor is needed, never
memory-mapped, so page-cache pages of the file never count in the process's memory. :func:`load_into` fills a
model built without initialisation (:func:`deferred_init`) one tensor at a time, dequantizing straight into
each parameter, or, with ``keep_packed=True``, swaps its linears and token embedding for packed GGUF layers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

from ..errors import CheckpointError
from ..nn.linear import Linear
from ..quant.gguf_blocks import SUPPORTED_TYPES, as_type, dequantize
from .names import normalize_legacy
from .report import LoadReport

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

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (gguf.GGUFValueType): struct format of each scalar type
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

_IOV_MAX = 1024  # buffers one preadv call may take (Linux)


class _Truncated(Exception):
    """The header ends before a value it announces."""


class _Cursor:
    """Little-endian reads from the start of a GGUF file's bytes, with bounds checks."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        width = struct.calcsize(fmt)
        if self.pos + width > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > self.size:
            raise _Truncated
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.take("<" + _SCALARS[kind])
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item in _NUMPY:
                width = np.dtype(_NUMPY[item]).itemsize
                if self.pos + width * count > self.size:
                    raise _Truncated
                values = np.frombuffer(self.buf, _NUMPY[item], count, self.pos).tolist()
                self.pos += width * count
                return values
            return [self.value(item) for _ in range(count)]  # arrays of arrays
        raise ValueError(f"unknown metadata value type {kind}")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in the file: GGML type, torch-order shape, absolute byte offset and length."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def parse_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """``(metadata, tensors)`` of a GGUF file: every key/value pair (strings decoded, arrays as lists) and
    the tensor directory, checked against the file size. Raises ``ValueError`` on a damaged file."""
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size < 24 or fh.read(4) != _MAGIC:
            raise ValueError("GGUF magic invalid")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cursor = _Cursor(buf)
            try:
                return _parse(cursor, size)
            except _Truncated:
                raise ValueError(f"the header ends at byte {size} inside a value") from None
            except UnicodeDecodeError:
                raise ValueError(f"a string near byte {cursor.pos} is not UTF-8") from None


def _parse(cursor: _Cursor, size: int) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} (big-endian or too old; versions {_VERSIONS} are read)")
    n_tensors, n_kv = cursor.take("<Q"), cursor.take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        if key in metadata:
            raise ValueError(f"metadata key {key} appears twice")
        metadata[key] = cursor.value(cursor.take("<I"))
    directory = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
        kind, offset = cursor.take("<I"), cursor.take("<Q")
        directory.append((name, dims, kind, offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, kind, offset in directory:
        if name in tensors:
            raise ValueError(f"tensor {name} appears twice")
        qtype = as_type(kind)
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims)) if dims else 1
        nbytes = count // block * type_size
        if start + offset + nbytes > size:
            raise ValueError(f"tensor {name} ends at byte {start + offset + nbytes}, past the end ({size})")
        tensors[name] = TensorInfo(name, qtype, tuple(int(n) for n in reversed(dims)), start + offset, nbytes)
    return metadata, tensors


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: its packed bytes (a uint8 tensor of ours), type and torch shape."""

    name: str
    data: Tensor
    type: GGMLQuantizationType
    shape: tuple[int, ...]


class GGUFCheckpoint:
    """One GGUF file, read lazily; see the module docstring."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.metadata, self._tensors = parse_header(self.path)
        except (ValueError, CheckpointError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({first}): it is truncated or "
                                  "corrupt; download it again") from None
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"{self.path} holds a {self.architecture or 'unnamed'!r} model; deltaformer reads "
                                  f"GGUF files of {', '.join(ARCHITECTURES)} architecture")

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

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """The tensor directory, by GGUF tensor name, in file order."""
        return dict(self._tensors)

    def tensor_types(self) -> dict[str, str]:
        """Each stored tensor's GGML type name, by GGUF tensor name."""
        return {name: t.type.name for name, t in self._tensors.items()}

    def type_counts(self) -> dict[str, int]:
        """How many tensors the file stores in each GGML type, most frequent first."""
        return dict(Counter(t.type.name for t in self._tensors.values()).most_common())

    def raw(self, name: str) -> RawTensor:
        """A tensor's packed bytes (read from the file now), type and (torch-order) shape, by GGUF name."""
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        info = self._tensors[name]
        return RawTensor(name, self._read(info), info.type, info.shape)

    def _read(self, info: TensorInfo, row_bytes: int | None = None, destination: Tensor | None = None) -> Tensor:
        """The tensor's bytes, flat; or, given ``row_bytes`` and ``destination`` (the index each stored row goes
        to), as rows scattered straight into place, so reordering rows needs no second copy."""
        if row_bytes is None or destination is None:
            data = torch.empty(info.nbytes, dtype=torch.uint8)
            buffers = [data.numpy().data]
        else:
            data = torch.empty(info.nbytes // row_bytes, row_bytes, dtype=torch.uint8)
            rows = data.numpy()
            buffers = [rows[i].data for i in destination.tolist()]
        got = 0
        with open(self.path, "rb", buffering=0) as fh:
            for start in range(0, len(buffers), _IOV_MAX):
                chunk = buffers[start:start + _IOV_MAX]
                size = sum(b.nbytes for b in chunk)
                read = os.preadv(fh.fileno(), chunk, info.offset + got)
                got += read
                if read != size:
                    break
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {info.name} is cut short (the file changed while "
                                  "loading, or is truncated)")
        return data

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

    def _rotary_heads(self, name: str) -> int | None:
        """Heads whose rows llama.cpp permuted in tensor ``name`` (None for tensors it left alone)."""
        if ".attn_q." in name:
            return int(self._key("attention.head_count"))
        if ".attn_k." in name:
            return int(self._key("attention.head_count_kv", self._key("attention.head_count")))
        return None

    def packed_rows(self, name: str) -> Tensor | None:
        """Tensor ``name``'s bytes as (rows, bytes per row) uint8 in HF row order, or None when its rows do not
        start on block boundaries (then only the whole tensor can be unpacked)."""
        info = self._tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.type]
        if len(info.shape) != 2 or info.shape[1] % block:
            return None
        row_bytes = info.shape[1] // block * type_size
        heads = self._rotary_heads(name)
        if heads is None:
            return self._read(info).view(info.shape[0], row_bytes)
        hf_order = unpermute_rotary(torch.arange(info.shape[0]), heads)  # HF row i is stored row hf_order[i]
        return self._read(info, row_bytes, destination=torch.argsort(hf_order))

    def dequantized(self, name: str, out: Tensor | None = None) -> Tensor:
        """Tensor ``name`` in fp32 and HF layout, unpacked into ``out`` when given (its shape and dtype fp32)."""
        info = self._tensors[name]
        heads = self._rotary_heads(name)
        rows = self.packed_rows(name) if heads is not None else None
        if heads is not None and rows is None:  # rows not block-aligned: unpack whole, then reorder rows
            tensor = unpermute_rotary(dequantize(self._read(info), info.type, info.shape), heads)
            return tensor if out is None else out.copy_(tensor)
        data = rows if rows is not None else self._read(info)
        return dequantize(data, info.type, info.shape, out=out)

    def hf_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(hf_name, fp32 tensor)`` pairs, one at a time, query/key rows back in HF's rotary layout."""
        for name in self._tensors:
            hf = self.hf_name(name)
            if hf is not None:
                yield hf, self.dequantized(name)

    # --- tokenizer --------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return str(template) if template else None


#: Types a packed layer keeps as they are (rows must start on block boundaries); others are unpacked to fp32.
PACKABLE_TYPES = frozenset(SUPPORTED_TYPES - {GGMLQuantizationType.F32})


def load_into(model: Any, checkpoint: GGUFCheckpoint, keep_packed: bool = False,
              pending_init: list[_InitCall] | None = None) -> LoadReport:
    """Fill ``model`` (a :class:`~deltaformer.models.base.PreTrainedModel`, ideally built under
    :func:`deferred_init`) from ``checkpoint`` one tensor at a time; returns its ``LoadReport``.

    Each fp32 tensor is unpacked straight into its parameter, so loading needs the model plus one tensor's packed
    bytes. With ``keep_packed``, every ``Linear`` and the token embedding stored in a :data:`PACKABLE_TYPES`
    type (rows on block boundaries) become :class:`~deltaformer.quant.gguf_linear.GGUFLinear` /
    :class:`~deltaformer.quant.gguf_linear.GGUFEmbedding` holding the file's bytes; a head tied to the embedding
    shares its bytes. ``pending_init`` (from :func:`deferred_init`) initialises the weights the file lacks.
    """
    name_map = model.name_map()
    ours: dict[str, Tensor] = model.state_dict(keep_vars=True)
    translated: set[str] = set()
    unexpected: list[str] = []
    packed_layers: dict[int, nn.Module] = {}  # id(original weight) -> the packed layer now holding it
    for name, info in checkpoint.tensor_infos().items():
        hf = checkpoint.hf_name(name)
        if hf is None:
            continue
        mine_hf = model.hf_name_for_this_class(normalize_legacy(hf), name_map)
        if any(mine_hf.endswith(ignored) for ignored in model.hf_ignored):
            continue
        mine = name_map.to_ours(mine_hf)
        if mine is None or mine not in ours:
            unexpected.append(hf)
            continue
        target = ours[mine]
        if tuple(info.shape) != tuple(target.shape):
            raise CheckpointError(f"checkpoint weight {hf} has shape {tuple(info.shape)} but the model expects "
                                  f"{tuple(target.shape)}: the checkpoint's config.json does not match its weights")
        path, _, leaf = mine.rpartition(".")
        module = model.get_submodule(path) if path else model
        packed = (checkpoint.packed_rows(name) if keep_packed and leaf == "weight" and info.type in PACKABLE_TYPES
                  and isinstance(module, nn.Linear | nn.Embedding) else None)
        if packed is not None:
            layer = _packed_layer(module, packed, info.type)
            packed_layers[id(target)] = layer
            _replace(model, path, layer)
        else:
            with torch.no_grad():
                checkpoint.dequantized(name, out=target.data)
        translated.add(mine)
    for path, module in list(model.named_modules()):  # a head tied to a weight now packed reads its bytes
        weight = module.weight if type(module) in (nn.Linear, Linear) else None
        if weight is not None and id(weight) in packed_layers:
            _replace(model, path, _tied_layer(module, packed_layers[id(weight)]))
    missing = [k for k in ours if k not in translated and not model._derived(k)]
    fatal = [k for k in missing if not k.startswith(model.head_prefixes)]
    if fatal:
        raise CheckpointError(f"checkpoint lacks {len(fatal)} weight(s) of {type(model).__name__}, e.g. {fatal[0]}: "
                              "is it a checkpoint of this architecture?")
    if pending_init:
        fresh = {ours[k].data_ptr() for k in missing if ours[k].numel()}
        for call in pending_init:
            if call.tensor.numel() and call.tensor.data_ptr() in fresh:
                call.replay()
    return LoadReport(missing=missing, unexpected=unexpected)


def _packed_layer(module: nn.Module, packed: Tensor, qtype: GGMLQuantizationType) -> nn.Module:
    from ..quant.gguf_linear import GGUFEmbedding, GGUFLinear

    if isinstance(module, nn.Embedding):
        return GGUFEmbedding(packed, qtype, module.embedding_dim, module.padding_idx)
    assert isinstance(module, nn.Linear)
    return GGUFLinear(packed, qtype, module.in_features, module.bias)


def _tied_layer(module: nn.Module, source: nn.Module) -> nn.Module:
    from ..quant.gguf_linear import GGUFEmbedding, GGUFLinear

    assert isinstance(module, nn.Linear) and isinstance(source, GGUFEmbedding | GGUFLinear)
    if module.bias is not None or not isinstance(source, GGUFEmbedding):
        raise CheckpointError(f"{type(module).__name__} tied to a packed {type(source).__name__}: only a bias-free "
                              "head tied to the token embedding can share packed bytes; load with keep_packed=False")
    return GGUFLinear.tied(source)


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


# --- building a model without initialising it ----------------------------------------------------------------

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@dataclass
class _InitCall:
    fn: Callable[..., Any]
    tensor: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def replay(self) -> None:
        self.fn(self.tensor, *self.args, **self.kwargs)


_deferral = threading.local()  # .calls: the list the current thread records into, while it defers
_deferral_lock = threading.Lock()
_deferring_threads = 0
_original_init: dict[str, Callable[..., Any]] = {}


def _dispatcher(name: str) -> Callable[..., Any]:
    original = _original_init[name]

    def init(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls = getattr(_deferral, "calls", None)
        if calls is None:  # another thread, not deferring: initialise as usual
            return original(tensor, *args, **kwargs)
        calls.append(_InitCall(original, tensor, args, kwargs))
        return tensor
    return init


@contextlib.contextmanager
def deferred_init() -> Iterator[list[_InitCall]]:
    """Build modules without running ``torch.nn.init``: in this thread, each call is recorded (in the list
    this yields) instead, so a checkpoint's tensors are written once and only the weights it lacks are
    initialised (:func:`load_into` replays their calls). Untouched parameters cost no memory until written.
    Other threads keep initialising normally."""
    global _deferring_threads
    with _deferral_lock:
        if _deferring_threads == 0:
            _original_init.update({name: getattr(nn.init, name) for name in _INIT_FUNCTIONS})
            for name in _INIT_FUNCTIONS:
                setattr(nn.init, name, _dispatcher(name))
        _deferring_threads += 1
    outer = getattr(_deferral, "calls", None)
    calls: list[_InitCall] = []
    _deferral.calls = calls
    try:
        yield calls
    finally:
        _deferral.calls = outer
        with _deferral_lock:
            _deferring_threads -= 1
            if _deferring_threads == 0:
                for name, fn in _original_init.items():
                    setattr(nn.init, name, fn)


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
    """A :class:`GGUFCheckpoint`, shared while the file is unchanged: the tokenizer and the model of one file
    read its header once."""
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
