"""Linear and LayerNorm layers that carry deltas: the wrapper that stands in for them and the parts inside.

A wrapper keeps the wrapped layer's own ``weight``/``bias`` parameters under the same names, so the base
state dict, HF name maps and optimizers holding base parameters all keep working. Each method with deltas
on the layer owns one :class:`LayerPart` in it, applied in :data:`PART_ORDER`.

A quantized linear (any :class:`~deltaformer.quant.base.QuantizedLinear`) is wrapped by :class:`DeltaQuantLinear`:
its packed tensors stay packed under their own names, its own forward is the base product (dequantized tiles,
gradient to the input only), and no fp32 copy of its weight is made or kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DeltaError
from ..nn.linear import PLAIN_LINEARS, Linear, linear
from ..quant.base import QuantizedLinear
from .config import DeltaConfig
from .parts import StackedDelta
from .routing import DeltaRouter, Selection

#: Order in which parts of different methods apply inside one wrapped layer.
PART_ORDER = ("ia3", "bitfit", "lora", "adapter")

C = TypeVar("C", bound=DeltaConfig)


class LayerPart(StackedDelta, ABC, Generic[C]):
    """What a method's part in a wrapped layer must provide (LoRA, IA3, BitFit, adapters).

    Its forward is split around the base layer: :meth:`on_input` may change the layer's input (only parts
    with ``acts_on_input``), :meth:`on_output` its output; both leave what they are not about unchanged.
    """

    #: Whether :meth:`on_input` may change the input; when no chosen part does, a caller may compute the
    #: base product itself (a fused QKV projection) and finish with :meth:`DeltaWrapper.output_side`.
    acts_on_input: ClassVar[bool] = False

    @abstractmethod
    def add_slot(self, name: str, config: C, wrapper: DeltaWrapper, options: Mapping[str, Any]) -> None:
        """Add delta ``name`` with the per-module ``options`` its method computed (a rank, a side)."""

    @abstractmethod
    def slot_state(self, s: int) -> dict[str, Tensor]:
        """Slot ``s``'s tensors by their file key (peft's where peft has one), without padding."""

    @abstractmethod
    def load_slot_state(self, s: int, tensors: dict[str, Tensor]) -> None:
        """Fill slot ``s`` from tensors keyed as :meth:`slot_state` writes them (shapes checked)."""

    def merge_slot(self, wrapper: DeltaWrapper, s: int, sign: float) -> None:
        """Fold slot ``s`` into the wrapper's weights (``sign`` -1: take it out again). Only mergeable
        methods' parts implement it; :meth:`~.method.Method.merge` refuses the others before calling it."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    def on_input(self, x: Tensor, sel: Selection) -> Tensor:
        return x

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        return y


class DeltaWrapper(nn.Module):
    """Stands in for a wrapped layer: its ``weight``/``bias`` parameters (same names) plus method parts.

    ``forward``: input-side parts (IA3 input scaling), the base layer, then output-side parts in
    :data:`PART_ORDER`. With nothing selected it is exactly the base layer.
    """

    in_features: int
    out_features: int
    weight: Tensor
    bias: Tensor | None  # None for layers without one

    def __init__(self, base: nn.Module, router: DeltaRouter) -> None:
        """Subclasses take over ``base``'s tensors (a plain layer's ``weight``/``bias`` under the same names)."""
        super().__init__()
        self.router = router
        self.parts: dict[str, LayerPart[Any]] = {}  # the registered part modules, in PART_ORDER

    @property
    def like(self) -> Tensor:
        """A tensor with the dtype and device new delta parameters take (the base weight's)."""
        return self.weight

    def check_merge(self) -> None:
        """Raise when deltas cannot be folded into this layer's weights in place (a quantized base)."""

    def base_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        raise NotImplementedError

    @property
    def part_names(self) -> list[str]:
        return list(self.parts)

    def part(self, method: str) -> LayerPart[Any] | None:
        return self.parts.get(method)

    def add_part(self, part: LayerPart[Any]) -> LayerPart[Any]:
        part.train(self.training)  # a new part starts in training mode; an eval model must not drop out
        self.add_module(part.method, part)
        self._order()
        return part

    def remove_part(self, method: str) -> None:
        del self._modules[method]
        self._order()

    def _order(self) -> None:
        self.parts = {m: p for m in PART_ORDER if isinstance(p := self._modules.get(m), LayerPart)}

    def chosen(self, x: Tensor) -> list[tuple[LayerPart[Any], Selection]]:
        """The parts that apply to this batch, with their selections, in :data:`PART_ORDER`."""
        chosen = []
        for part in self.parts.values():
            sel = part.select(x.shape[0], x.device)
            if sel is not None:
                chosen.append((part, sel))
        return chosen

    def output_side(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        """For a caller that computes the base product itself (a fused QKV projection): the function turning
        the base output for input ``x`` into this layer's output, or None when a part changes the input."""
        chosen = self.chosen(x)
        if any(part.acts_on_input for part, _ in chosen):
            return None

        def finish(y: Tensor) -> Tensor:
            for part, sel in chosen:
                y = part.on_output(x, y, sel)
            return y

        return finish

    def forward(self, x: Tensor) -> Tensor:
        chosen = self.chosen(x)
        if not chosen:
            return self.base_forward(x)
        h = x
        for part, sel in chosen:
            h = part.on_input(h, sel)
        y = self.base_forward(h)
        for part, sel in chosen:
            y = part.on_output(x, y, sel)
        return y


class DeltaLinear(DeltaWrapper):
    """A wrapped ``nn.Linear`` (not a subclass: fused paths that only trust plain linears skip it)."""

    def __init__(self, base: nn.Linear, router: DeltaRouter) -> None:
        super().__init__(base, router)
        self.weight, self.bias = base.weight, base.bias
        self.in_features = base.in_features
        self.out_features = base.out_features

    def base_forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def unwrap(self) -> nn.Linear:
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias  # type: ignore[assignment]  # the wrapped layer's own Parameters
        return plain


class DeltaLayerNorm(DeltaWrapper):
    """A wrapped ``nn.LayerNorm`` (BitFit trains bias deltas of LayerNorms too)."""

    def __init__(self, base: nn.LayerNorm, router: DeltaRouter) -> None:
        super().__init__(base, router)
        self.weight, self.bias = base.weight, base.bias
        self.normalized_shape = base.normalized_shape
        self.eps = base.eps
        self.out_features = base.normalized_shape[-1]

    def base_forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def unwrap(self) -> nn.LayerNorm:
        plain = nn.LayerNorm(self.normalized_shape, eps=self.eps, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias  # type: ignore[assignment]  # the wrapped layer's own Parameters
        return plain


class DeltaQuantLinear(DeltaWrapper):
    """A wrapped quantized linear: deltas train on a frozen packed base, whose weight stays packed.

    The wrapper shares the quantized layer's parameter and buffer tables (the same dict objects), so its
    packed tensors keep their names in the state dict, move with ``.to`` and load in place, while the layer
    itself is held outside the module tree and runs as the base product: one block of dequantized rows at a
    time, the input gradient through them, no weight gradient. Reading ``weight`` dequantizes (for
    inspection only); deltas are never merged into it in place (:meth:`check_merge`), since writing the sum
    back needs quantizing again: :func:`deltaformer.quant.merge.merge_quantized` does that and reports the cost.
    """

    quantized: QuantizedLinear

    def __init__(self, base: QuantizedLinear, router: DeltaRouter) -> None:
        super().__init__(base, router)
        if next(base.children(), None) is not None:
            raise DeltaError(f"{type(base).__name__} holds submodules; deltas wrap quantized linears whose packed "
                             "tensors are their own parameters and buffers")
        object.__setattr__(self, "quantized", base)  # not a submodule: its tensors are the wrapper's (shared tables)
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        if "bias" not in self._parameters and "bias" not in self._buffers:
            object.__setattr__(self, "bias", base.bias)
        self.in_features, self.out_features, self.scheme = base.in_features, base.out_features, base.scheme

    @property
    def weight(self) -> Tensor:
        """A dequantized fp32 copy (for inspection: the layer itself stays packed)."""
        return self.quantized.dequantize()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise DeltaError("a quantized layer's weight is packed and frozen: quantize a new layer instead of setting it")

    @property
    def like(self) -> Tensor:
        tensors = [*self._buffers.values(), *self._parameters.values()]
        device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
        return torch.empty(0, dtype=torch.float32, device=device)

    def check_merge(self) -> None:
        raise DeltaError(f"this layer's base is quantized ({self.scheme}): a delta cannot be merged into packed "
                         "weights in place; use deltaformer.quant.merge.merge_quantized (dequantize, merge, quantize "
                         "again, with the error reported) or `deltaformer merge RUN --out DIR`")

    def output_side(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        return None  # a fused QKV product would concatenate dequantized weights: run the packed product instead

    def base_forward(self, x: Tensor) -> Tensor:
        return self.quantized(x)

    def unwrap(self) -> QuantizedLinear:
        return self.quantized

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


WRAPPERS: dict[type, type[DeltaWrapper]] = {
    **{kind: DeltaLinear for kind in PLAIN_LINEARS}, nn.LayerNorm: DeltaLayerNorm}


def base_type(module: nn.Module) -> type | None:
    """The plain layer type ``module`` is or wraps (Linear, LayerNorm), or None for anything else."""
    if isinstance(module, DeltaLinear | DeltaQuantLinear | QuantizedLinear) or type(module) in PLAIN_LINEARS:
        return nn.Linear
    if isinstance(module, DeltaLayerNorm):
        return nn.LayerNorm
    return type(module) if type(module) in WRAPPERS else None


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def wrap(model: nn.Module, path: str, router: DeltaRouter) -> DeltaWrapper:
    """The wrapper at ``path``, replacing the plain layer there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, DeltaWrapper):
        return module
    wrapper: DeltaWrapper
    if isinstance(module, QuantizedLinear):
        wrapper = DeltaQuantLinear(module, router)
    else:
        cls = WRAPPERS.get(type(module))
        if cls is None or not isinstance(module, (nn.Linear, nn.LayerNorm)):
            raise DeltaError(f"{path} is a {type(module).__name__}, not a plain or quantized Linear/LayerNorm: "
                             "target another module")
        wrapper = cls(module, router)
    wrapper.train(module.training)
    parent, child = _parent(model, path)
    setattr(parent, child, wrapper)
    return wrapper


def unwrap_if_empty(model: nn.Module, path: str) -> None:
    module = model.get_submodule(path)
    if isinstance(module, DeltaWrapper) and not module.parts:
        parent, child = _parent(model, path)
        plain = module.unwrap()
        plain.train(module.training)
        setattr(parent, child, plain)
