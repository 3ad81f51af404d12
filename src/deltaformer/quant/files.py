"""Quantized checkpoints: a directory with ``config.json`` and ``quantized.safetensors`` that reloads packed.

The safetensors file holds the model's state dict as quantized (packed integer buffers and scales of every
:class:`~deltaformer.quant.layers.QuantLinear`, fp32 for the rest; tied copies left out) and, in its metadata
under :data:`META_KEY`, a JSON object naming the format version, the model class and, per quantized layer, its
:meth:`QuantLinear.spec` (scheme and parameters). Loading builds the model from ``config.json``, swaps in layers
of those specs, checks every tensor of the file against the shape and dtype the metadata implies (a mismatch, a
missing or an extra tensor is a one-line :class:`QuantError`, nothing loaded), then copies them in.
``PreTrainedModel.from_pretrained(DIR)`` comes here when ``DIR`` holds :data:`QUANT_FILE`.
Every file is written through a temporary file and renamed (``checkpoints.io.atomic_write``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..checkpoints.io import atomic_write, save_state_dict
from ..errors import QuantError
from .layers import QuantLinear

QUANT_FILE = "quantized.safetensors"
META_KEY = "deltaformer.quantization"
FORMAT_VERSION = 1


def is_quantized(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_quantized`."""
    return (Path(path) / QUANT_FILE).is_file()


def _tied(model: nn.Module) -> set[str]:
    tied = getattr(model, "tied_parameters", None)
    return set(tied()) if callable(tied) else set()


def quantized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Spec of every quantized layer of ``model``, by module path."""
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, directory: str | Path, tokenizer: Any = None,
                   options: dict[str, Any] | None = None) -> Path:
    """Write a quantized ``model`` (``quant.quantize`` applied) to ``directory``; returns the weights file.

    ``options`` (the scheme and settings asked for) are kept in the metadata for the record.
    """
    layers = quantized_layers(model)
    if not layers:
        raise QuantError("the model has no quantized layers: quantize it first (quant.layers.quantize)")
    config = getattr(model, "config", None)
    if config is None:
        raise QuantError(f"{type(model).__name__} has no config to save beside its weights")
    tied = _tied(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    meta = {"version": FORMAT_VERSION, "architecture": getattr(model, "hf_architecture", type(model).__name__),
            "options": options or {}, "layers": layers}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / QUANT_FILE
    save_state_dict(state, out, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    architecture = getattr(model, "hf_architecture", None)
    if architecture:  # as save_pretrained does: load_model picks the class from it
        config.extra = {**config.extra, "architectures": [architecture]}
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The quantization metadata of a :data:`QUANT_FILE` (one-line errors for anything unreadable)."""
    file = Path(path) / QUANT_FILE if Path(path).is_dir() else Path(path)
    try:
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as err:
        raise QuantError(f"{file} is not a readable safetensors file ({err}): write it again") from None
    if raw is None:
        raise QuantError(f"{file} has no {META_KEY} metadata: it was not written by `deltaformer quantize`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise QuantError(f"{file}: its {META_KEY} metadata is not valid JSON: the file was damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict):
        raise QuantError(f"{file}: its {META_KEY} metadata lacks the per-layer specs: the file was damaged")
    if meta.get("version") != FORMAT_VERSION:
        raise QuantError(f"{file} is quantized-file format {meta.get('version')!r}; this deltaformer reads "
                         f"{FORMAT_VERSION}: write it again with this version")
    return meta


def apply_layers(model: nn.Module, layers: dict[str, dict[str, Any]], where: str = "the metadata") -> None:
    """Swap each named ``nn.Linear`` of ``model`` for a :class:`QuantLinear` of its spec (values to be loaded)."""
    built: list[tuple[str, QuantLinear]] = []
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QuantError(f"{where} names layer {name!r}, which this model does not have") from None
        if not isinstance(module, nn.Linear):
            raise QuantError(f"{where} names layer {name!r}, which is a {type(module).__name__}, not a Linear")
        if not isinstance(spec, dict):
            raise QuantError(f"{where}: the spec of layer {name!r} is not an object")
        try:
            built.append((name, QuantLinear.from_spec(spec, module)))
        except QuantError as err:
            raise QuantError(f"{where}, layer {name}: {err}") from None
    for name, layer in built:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def load_quantized_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Quantize ``model``'s layers as the file at ``path`` says and load its tensors (checked first)."""
    file = Path(path) / QUANT_FILE if Path(path).is_dir() else Path(path)
    meta = read_metadata(file)
    apply_layers(model, meta["layers"], f"{file}'s metadata")
    tied = _tied(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    tensors: dict[str, Tensor] = {}
    with safe_open(str(file), "pt") as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model has no place for"
            raise QuantError(f"{file} {what} ({len(missing)} missing, {len(extra)} unexpected): its tensors do "
                             "not match its quantization metadata")
        for name in sorted(names):
            info = f.get_slice(name)
            shape, dtype = tuple(info.get_shape()), info.get_dtype()
            want = expected[name]
            want_dtype = str(want.dtype).removeprefix("torch.")
            if shape != tuple(want.shape) or _dtype_name(dtype) != want_dtype:
                raise QuantError(f"{file}: tensor {name} is {dtype} {list(shape)} but its metadata implies "
                                 f"{want_dtype} {list(want.shape)}: the file was damaged or edited")
            tensors[name] = f.get_tensor(name)
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
                       "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _dtype_name(name: str) -> str:
    return _SAFETENSORS_DTYPES.get(name, name.lower())


def load_quantized(cls: Any, path: str | Path, config: Any, **config_changes: Any) -> Any:
    """``cls.from_pretrained`` for a quantized directory: the model built from ``config``, loaded packed.

    The caller (``models.base``) reads the config, so this module needs nothing above ``quant/``.
    """
    path = Path(path)
    if not isinstance(config, cls.config_class):
        raise QuantError(f"{path} holds a {config.model_type!r} model; {cls.__name__} needs "
                         f"{cls.config_class.model_type!r}")
    if config_changes:
        config = config.replace(**config_changes)
    model = cls(config)
    load_quantized_state(model, path)
    return model.eval()
