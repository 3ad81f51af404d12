"""Delta files: ``adapter_config.json`` + ``adapter_model.safetensors``, peft's format where peft has one.

LoRA, IA3, prompt tuning and prefix tuning write exactly what peft writes (key names from the model's HF
name map, ``base_model.model.`` prefix, peft config fields), so ``PeftModel.from_pretrained(hf_model, dir)``
loads ours and :func:`load_delta` loads peft's. Other methods write the same two files with our own
``peft_type`` (``DELTAFORMER_*``) and their config under ``"deltaformer"``. Our full config also rides in
the safetensors metadata, which peft ignores, so options peft cannot express (P-tuning v2, target names
as given) survive a round trip. Both files are written atomically.

``adapter_config.json`` is the source of truth (peft reads only it): when the metadata describes a delta
whose adapter_config.json would differ from the file's (a user edited ``lora_alpha`` or ``r``), loading
stops with an error naming both values instead of silently following the metadata.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..checkpoints.io import atomic_write, save_state_dict
from ..errors import DeltaError
from .config import DeltaConfig
from .host import host_or_none, require_router
from .method import METHODS, PEFT_PREFIX, Method, method_for
from .ops import check_shape
from .targets import head_paths, hf_name, our_name_from_hf

log = logging.getLogger("deltaformer")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_KEY = "deltaformer"

#: peft task types of our task classes (peft picks its model wrapper, and so its forward, from these).
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def task_type(model: nn.Module, prompt_learning: bool) -> str | None:
    """peft's ``task_type`` for this model class; prompt learning on a bare encoder is feature extraction."""
    host = host_or_none(model)
    arch = host.hf_architecture if host is not None else ""
    for suffix, kind in TASK_TYPES.items():
        if arch.endswith(suffix):
            return kind
    return "FEATURE_EXTRACTION" if prompt_learning else None


def base_model_name(model: nn.Module) -> str | None:
    host = host_or_none(model)
    return (host.config.extra.get("_name_or_path") or None) if host is not None else None


def save_delta(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write delta ``name`` (and the task head) to ``directory``; returns the directory."""
    router = require_router(model)
    if name not in router.deltas:
        raise DeltaError(f"no delta named {name!r} to save: attached are {', '.join(router.deltas)}")
    info = router.deltas[name]
    method = method_for(info.method)
    config_json, tensors = method.export(model, name, info.config)
    heads = head_paths(model, info.config)
    prefix = "base_model." if method.prompt_learning else PEFT_PREFIX
    for head in heads:
        for pname, param in model.get_submodule(head).named_parameters():
            tensors[f"{prefix}{hf_name(model, head)}.{pname}"] = param.detach()
    config_json["modules_to_save"] = [hf_name(model, h) for h in heads] or None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"method": info.method, "name": name, "config": info.config.to_dict()})
    save_state_dict({k: v.detach().cpu() for k, v in tensors.items()}, directory / WEIGHTS_FILE, {META_KEY: meta})
    text = json.dumps(config_json, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_delta_files(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any] | None]:
    """(adapter_config.json, tensors, our metadata or None); every failure is a :class:`DeltaError`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise DeltaError(f"{directory} has no {CONFIG_FILE}: pass a directory written by save_delta or peft")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaError(f"{config_path} is not valid JSON ({exc}): the file is corrupted; re-save the delta") from exc
    if not isinstance(data, dict):
        raise DeltaError(f"{config_path} holds a {type(data).__name__}, not a JSON object: re-save the delta")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / "adapter_model.bin").is_file():
        raise DeltaError(f"{directory} holds adapter_model.bin (a pickle), which deltaformer does not load: re-save "
                         "it with peft's save_pretrained(dir, safe_serialization=True)")
    if not weights.is_file():
        raise DeltaError(f"{directory} has no {WEIGHTS_FILE}: the delta was not saved completely; re-save it")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeltaError(f"{weights} is truncated or corrupted ({exc}): re-save or re-download the delta") from exc
    meta = None
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except json.JSONDecodeError:
            meta = None
    return data, tensors, meta


def load_delta(model: nn.Module, directory: str | Path, name: str | None = None, *, head: bool = True) -> nn.Module:
    """Attach the delta saved in ``directory`` as ``name`` (default: its saved name or "default").

    The task head in the file (peft's modules_to_save) is loaded too unless ``head=False``. On any
    error the model is left as it was.
    """
    from .api import active, attach, detach, set_active

    data, tensors, meta = read_delta_files(directory)
    method, config, from_meta = _method_and_config(data, meta, model)
    name = name or (meta or {}).get("name") or "default"
    head_tensors, delta_tensors = _split_head(model, tensors, method)
    was_active = active(model)
    attach(model, config, name)
    try:
        if from_meta:
            _check_config_agrees(model, method, name, config, data, Path(directory))
        method.load_tensors(model, name, delta_tensors)
        if head:
            _load_head(model, head_tensors)
    except Exception:
        detach(model, name)
        if was_active:  # attach made the new delta the only active one; give the old ones back
            set_active(model, was_active)
        raise
    return model


def _method_and_config(data: dict[str, Any], meta: dict[str, Any] | None,
                       model: nn.Module) -> tuple[Method, DeltaConfig, bool]:
    """(method, config, whether the config came from our metadata rather than adapter_config.json)."""
    peft_type = data.get("peft_type")
    by_type = {m.peft_type: m for m in reversed(list(METHODS.values())) if m.peft_type}
    if peft_type not in by_type:
        raise DeltaError(f"unknown delta method peft_type={peft_type!r}: deltaformer loads "
                         f"{', '.join(sorted(by_type))}")
    if meta and meta.get("method") in METHODS and METHODS[meta["method"]].peft_type == peft_type:
        method = METHODS[meta["method"]]
        try:
            return method, method.config_class.from_dict(meta["config"]), True
        except (DeltaError, TypeError, KeyError):
            log.warning("ignoring unreadable deltaformer metadata in the delta file; using adapter_config.json")
    method = by_type[peft_type]
    try:
        return method, method.config_from_file(data, model), False
    except (TypeError, ValueError) as exc:
        raise DeltaError(f"adapter_config.json has a bad value for {peft_type} ({exc}): re-save the delta") from exc


#: adapter_config.json fields that say where a delta came from or how peft wraps it, not what the delta is.
_BOOKKEEPING = frozenset({"base_model_name_or_path", "task_type", "inference_mode", "modules_to_save", "revision",
                          "peft_version", "auto_mapping"})


def _check_config_agrees(model: nn.Module, method: Method, name: str, config: DeltaConfig, data: dict[str, Any],
                         directory: Path) -> None:
    """The attached delta (built from our metadata) must be the one adapter_config.json describes: what it
    would write there is compared with what the file holds, field by field."""
    written, _ = method.export(model, name, config)
    saved, found = _flat(written), _flat(data)
    differ = sorted(k for k in saved if k.split(".")[0] not in _BOOKKEEPING and found.get(k, _ABSENT) != saved[k])
    if differ:
        given = ", ".join(f"{k}={found[k]!r}" if k in found else f"no {k}" for k in differ)
        meant = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        raise DeltaError(f"{directory / CONFIG_FILE} has {given} but the deltaformer metadata in {WEIGHTS_FILE} has "
                         f"{meant}: adapter_config.json is what peft reads, so the two files disagree; undo the "
                         "edit, or re-save the delta with save_delta")


_ABSENT = object()


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """Our own formats nest the config under ``deltaformer``: compare its fields one by one."""
    out = {k: v for k, v in data.items() if k != META_KEY}
    if isinstance(data.get(META_KEY), dict):
        out.update({f"{META_KEY}.{k}": v for k, v in data[META_KEY].items()})
    return out


def _split_head(model: nn.Module, tensors: dict[str, Tensor], method: Method) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate head tensors (``base_model[.model].classifier.*``) from the delta's own."""
    heads = head_paths(model) or ["classifier"]
    head, rest = {}, {}
    for key, value in tensors.items():
        inner = key.removeprefix(PEFT_PREFIX).removeprefix("base_model.")
        top = inner.split(".")[0]
        if top in {hf_name(model, h).split(".")[0] for h in heads} and "modules_to_save" not in inner:
            head[inner] = value
        elif ".modules_to_save." in inner:
            raise DeltaError(f"{key} is an unmerged peft modules_to_save copy: save the adapter with peft's "
                             "save_pretrained, which writes the head under its own name")
        else:
            rest[key] = value
    return head, rest


def _load_head(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    state = dict(model.named_parameters())
    targets = {}
    for hf_key, value in tensors.items():
        ours = our_name_from_hf(model, hf_key)
        if ours is None or ours not in state:
            log.info("delta file holds head tensor %s, which this model lacks; not loaded", hf_key)
            continue
        check_shape(f"head tensor {hf_key}", value, state[ours].shape)
        targets[ours] = value
    with torch.no_grad():
        for ours, value in targets.items():
            state[ours].copy_(value)
