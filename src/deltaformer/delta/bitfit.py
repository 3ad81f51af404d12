"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Each delta stores bias *deltas* (zero-initialised), stacked per layer as ``delta`` (n_deltas, dim), and adds
them to the layer's output; the base biases stay frozen. That is what lets samples of one batch use
different BitFit deltas, and merging is exact: the base bias becomes ``bias + delta``.
Targets: every Linear and LayerNorm bias of the backbone, or the named subset (``("query", "mlp.up")``).
A model with no biases at all among its targets (Llama) gets the deltas on those linears' outputs instead,
zero-initialised biases of their own: training works the same, but merging is refused, since the base has
no bias to fold them into (keep the delta attached, or save it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import DeltaError
from .config import DeltaConfig
from .method import WrapperMethod, register
from .ops import check_shape, per_sample
from .routing import DeltaRouter, Selection
from .targets import match_targets
from .wrappers import DeltaWrapper, LayerPart, base_type


@dataclass
class BitFitConfig(DeltaConfig):
    """``targets``: None = every bias of the backbone (Linear and LayerNorm), else module names."""

    method: ClassVar[str] = "bitfit"
    finetune_lr: ClassVar[float] = 1e-3
    targets: tuple[str, ...] | str | None = field(default=None, metadata={
        "help": "modules whose biases train (None: every bias of the backbone)"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "only these layer indices"})
    modules_to_save: tuple[str, ...] | None = field(default=None, metadata={
        "help": "head modules trained and saved with the delta (None: the model's task head)"})


class BitFitPart(LayerPart[BitFitConfig]):
    method = "bitfit"
    stacked = ("delta",)
    delta: Tensor  # (n_deltas, dim), registered by stack_add

    def __init__(self, router: DeltaRouter, wrapper: DeltaWrapper) -> None:
        super().__init__(router)
        self.dim = wrapper.out_features

    def add_slot(self, name: str, config: BitFitConfig, wrapper: DeltaWrapper, options: Mapping[str, Any]) -> None:
        like = wrapper.bias if wrapper.bias is not None else wrapper.like
        self.stack_add(name, {"delta": like.new_zeros(self.dim).detach()})

    def on_output(self, x: Tensor, y: Tensor, sel: Selection) -> Tensor:
        return y + per_sample(self.delta, sel, y, 0.0)

    def merge_slot(self, wrapper: DeltaWrapper, s: int, sign: float) -> None:
        if wrapper.bias is None:
            raise DeltaError("this BitFit delta sits on layers without biases (the model has none), so there is no "
                             "bias to merge it into: keep it attached, or save it with save_delta")
        wrapper.bias.add_(self.delta[s].to(wrapper.bias.dtype), alpha=sign)

    def slot_state(self, s: int) -> dict[str, Tensor]:
        return {"bitfit.bias": self.delta[s].detach()}

    def load_slot_state(self, s: int, tensors: dict[str, Tensor]) -> None:
        check_shape("bitfit.bias", tensors["bitfit.bias"], (self.dim,))
        self.delta.data[s].copy_(tensors["bitfit.bias"])


class BitFit(WrapperMethod[BitFitConfig, BitFitPart]):
    name = "bitfit"
    config_class = BitFitConfig
    peft_type = "DELTAFORMER_BITFIT"
    mergeable = True
    part_class = BitFitPart
    part_keys = ("bitfit.bias",)

    def new_part(self, wrapper: DeltaWrapper, router: DeltaRouter, options: dict[str, Any]) -> BitFitPart:
        return BitFitPart(router, wrapper)

    def targets(self, model: nn.Module, config: BitFitConfig) -> dict[str, dict[str, Any]]:
        kinds = (nn.Linear, nn.LayerNorm)
        paths = match_targets(model, config.targets if config.targets is not None else r".*", kinds, config.layers)
        biased = [p for p in paths if model.get_submodule(p).bias is not None]
        if biased:
            return {p: {} for p in biased}
        linears = [p for p in paths if issubclass(base_type(model.get_submodule(p)) or nn.Module, nn.Linear)]
        return {p: {} for p in linears}


register(BitFit())
