"""What one delta method knows (attach, detach, merge, its file format), and the registry of methods.

Each method module (``lora``, ``ia3``, ...) defines one :class:`Method` subclass and registers an instance;
:func:`method_for` finds it by the name its config carries. :class:`WrapperMethod` is the shared
implementation for methods whose parts live in wrapped Linear/LayerNorm layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .routing import DeltaRouter
from .targets import hf_name, module_type, our_name_from_hf
from .wrappers import DeltaWrapper, LayerPart, unwrap_if_empty, wrap

#: Prefix of module keys in peft's adapter files (a tuner's ``base_model.model.<module>...``).
PEFT_PREFIX = "base_model.model."

C = TypeVar("C", bound=DeltaConfig)
P = TypeVar("P", bound="LayerPart[Any]")


class Method(Generic[C]):
    """What one delta method knows: attach/detach, file format, merge. Subclasses live one per module."""

    name: ClassVar[str] = ""
    config_class: type[C]
    peft_type: ClassVar[str] = ""
    #: peft's prompt-learning models save the head as ``base_model.<head>``, tuners as ``base_model.model.<head>``.
    prompt_learning: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    merge_reason: ClassVar[str] = ""

    def attach(self, model: nn.Module, config: C, name: str, router: DeltaRouter) -> None:
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, name: str, sign: float) -> None:
        raise DeltaError(f"{self.name} delta {name!r} cannot be merged into the base weights: {self.merge_reason}")

    def export(self, model: nn.Module, name: str, config: C) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(adapter_config.json fields, tensors by file key) of delta ``name``, without the head."""
        raise NotImplementedError

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> C:
        """Our config from an adapter_config.json written by peft or by :meth:`export`."""
        raise NotImplementedError

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        """Parameters of delta ``name`` per module type (layer index dropped), real sizes without padding."""
        raise NotImplementedError

    def own_config(self, data: dict[str, Any]) -> C:
        """Config of our own file format: ``{"peft_type": ..., "deltaformer": {fields}}``."""
        fields = data.get("deltaformer")
        if not isinstance(fields, dict):
            raise DeltaError(f"adapter_config.json of peft_type {data.get('peft_type')!r} lacks its 'deltaformer' "
                             "fields: re-save the delta with deltaformer.delta.save_delta")
        config = self.config_class.from_dict(fields)
        assert isinstance(config, self.config_class)
        return config


METHODS: dict[str, Method[Any]] = {}


def register(method: Method[Any]) -> Method[Any]:
    METHODS[method.name] = method
    return method


def method_for(name: str) -> Method[Any]:
    try:
        return METHODS[name]
    except KeyError:
        raise DeltaError(f"unknown delta method {name!r}: use one of {', '.join(METHODS)}") from None


class WrapperMethod(Method[C], Generic[C, P]):
    """A method whose parts live in wrapped Linear/LayerNorm layers (LoRA, IA3, BitFit, adapters).

    Subclasses give ``targets`` (module path -> per-module options), their part class and how to make one;
    files name tensors ``base_model.model.<HF module path>.<part key>`` as peft does.
    """

    part_class: type[P]
    part_keys: ClassVar[tuple[str, ...]] = ()

    def targets(self, model: nn.Module, config: C) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> P:
        raise NotImplementedError

    def attach(self, model: nn.Module, config: C, name: str, router: DeltaRouter) -> None:
        for path, options in self.targets(model, config).items():
            wrapper = wrap(model, path, router)
            part = wrapper.part(self.name) or wrapper.add_part(self.new_part(wrapper, router, options))
            part.add_slot(name, config, wrapper, options)

    def parts(self, model: nn.Module, name: str | None = None) -> Iterator[tuple[str, DeltaWrapper, P]]:
        for path, module in list(model.named_modules()):
            if isinstance(module, DeltaWrapper):
                part = module.part(self.name)
                if isinstance(part, self.part_class) and (name is None or name in part.slots):
                    yield path, module, part

    def detach(self, model: nn.Module, name: str) -> None:
        for path, wrapper, part in list(self.parts(model, name)):
            part.stack_remove(name)
            if not part.slots:
                wrapper.remove_part(self.name)
                unwrap_if_empty(model, path)

    def merge(self, model: nn.Module, name: str, sign: float) -> None:
        if not self.mergeable:  # adapters: refuse with the reason, not NotImplementedError from merge_slot
            super().merge(model, name, sign)
        for _, wrapper, _ in self.parts(model, name):
            wrapper.check_merge()  # every layer before any changes (a quantized base refuses)
        for _, wrapper, part in self.parts(model, name):
            with torch.no_grad():
                part.merge_slot(wrapper, part.slot(name), sign)
            if sign > 0:
                part.merged.add(name)
            else:
                part.merged.discard(name)

    def file_key(self, model: nn.Module, path: str, key: str) -> str:
        return f"{PEFT_PREFIX}{hf_name(model, path)}.{key}"

    def export(self, model: nn.Module, name: str, config: C) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {}
        for path, _, part in self.parts(model, name):
            for key, value in part.slot_state(part.slot(name)).items():
                tensors[self.file_key(model, path, key)] = value
        return self.file_config(model, name, config), tensors

    def file_config(self, model: nn.Module, name: str, config: C) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "deltaformer": config.to_dict()}

    def config_from_file(self, data: dict[str, Any], model: nn.Module) -> C:
        return self.own_config(data)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
        expected: dict[str, tuple[P, str]] = {}
        for path, _, part in self.parts(model, name):
            for key in part.slot_state(part.slot(name)):
                expected[f"{path}.{key}"] = (part, key)
        given = {}
        for file_key, value in tensors.items():
            ours = _our_key(model, file_key, self.part_keys)
            given[ours if ours is not None else file_key] = value
        check_keys(expected, given)
        by_part: dict[int, dict[str, Tensor]] = {}
        for full, (part, key) in expected.items():
            by_part.setdefault(id(part), {})[key] = given[full]
        for _, _, part in self.parts(model, name):
            part.load_slot_state(part.slot(name), by_part[id(part)])

    def counts(self, model: nn.Module, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for path, _, part in self.parts(model, name):
            kind = module_type(path)
            out[kind] = out.get(kind, 0) + part.slot_numel(part.slot(name))
        return out


def _our_key(model: nn.Module, file_key: str, part_keys: Sequence[str]) -> str | None:
    """``base_model.model.<hf module>.<part key>`` -> ``<our module>.<part key>`` (None when unknown)."""
    key = file_key[len(PEFT_PREFIX):] if file_key.startswith(PEFT_PREFIX) else file_key
    for part_key in sorted(part_keys, key=len, reverse=True):
        if key.endswith("." + part_key):
            module = our_name_from_hf(model, key[: -len(part_key) - 1])
            return None if module is None else f"{module}.{part_key}"
    return None


def check_keys(expected: dict[str, Any], given: dict[str, Tensor]) -> None:
    """A delta file must hold exactly the tensors its config implies."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise DeltaError(f"the delta file lacks {len(missing)} tensor(s) its config implies, e.g. {missing[0]}: "
                         "the file is incomplete or was saved for another model")
    if unexpected:
        raise DeltaError(f"the delta file has {len(unexpected)} tensor(s) its config does not explain, e.g. "
                         f"{unexpected[0]}: it was saved for another model or with another config")
