"""Former home of the shared delta mechanism, kept so ``from deltaformer.delta.base import X`` still works.

Each name now lives in the module that owns its job (see the package docstring); import from there in
new code. Nothing is defined here.
"""

from __future__ import annotations

from ..errors import DeltaError
from .config import DeltaConfig
from .host import DeltaHost, backbone_of, find_router, get_router, require_router
from .method import METHODS, PEFT_PREFIX, Method, WrapperMethod, check_keys, method_for, register
from .ops import add_product, check_shape, kaiming_rows, pad_to, per_sample, sample_dropout
from .parts import StackedDelta
from .routing import BARE, DeltaInfo, DeltaRouter, Selection
from .targets import (
    backbone_relative,
    head_paths,
    hf_name,
    layer_of,
    match_targets,
    module_type,
    our_name_from_hf,
    pattern_value,
    without_excluded,
)
from .wrappers import (
    PART_ORDER,
    WRAPPERS,
    DeltaLayerNorm,
    DeltaLinear,
    DeltaWrapper,
    LayerPart,
    unwrap_if_empty,
    wrap,
)

__all__ = [
    "BARE", "METHODS", "PART_ORDER", "PEFT_PREFIX", "WRAPPERS", "DeltaConfig", "DeltaError", "DeltaHost",
    "DeltaInfo", "DeltaLayerNorm", "DeltaLinear", "DeltaRouter", "DeltaWrapper", "LayerPart", "Method",
    "Selection", "StackedDelta", "WrapperMethod", "add_product", "backbone_of", "backbone_relative",
    "check_keys", "check_shape", "find_router", "get_router", "head_paths", "hf_name", "kaiming_rows",
    "layer_of", "match_targets", "method_for", "module_type", "our_name_from_hf", "pad_to", "pattern_value",
    "per_sample", "register", "require_router", "sample_dropout", "unwrap_if_empty", "without_excluded", "wrap",
]
