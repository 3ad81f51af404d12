"""Delta tuning: every method behind one API, stacked per layer and routed per sample.

    from deltaformer import delta
    delta.attach(model, delta.LoraConfig(r=8, targets=("query", "value")), "sst")
    delta.attach(model, delta.IA3Config(), "news")
    with delta.route(model, ["sst", "news", None]):   # one delta (or the bare model) per sample
        out = model(**batch)
    delta.save_delta(model, "out/sst", "sst")          # peft's files for LoRA, IA3, prompt and prefix tuning

One module per method (``lora``, ``ia3``, ``bitfit``, ``adapter``, ``prefix``, ``prompt``, ``ptuning``); the
shared mechanism, one job per module: ``config`` (DeltaConfig), ``routing`` (the router and its selections),
``parts`` (the stacked store), ``wrappers`` (wrapped Linear/LayerNorm and the parts inside them), ``hooks``
(input-side stores in the prompt hook), ``host`` (the :class:`~.host.DeltaHost` protocol a model
implements), ``targets`` (module matching and HF names), ``method`` (the Method interface and registry),
``ops`` (tensor helpers), ``api`` (the verbs) and ``files`` (peft's format). ``base`` only re-exports the
names it used to define. Probing (``layer_features``) is a training mode: :mod:`deltaformer.train.probe`.
"""

from __future__ import annotations

from ..errors import DeltaError
from .adapter import AdapterConfig
from .api import (
    active,
    attach,
    bare,
    delta_parameters,
    deltas,
    detach,
    format_summary,
    freeze_base,
    head_parameters,
    merge,
    merge_and_unload,
    route,
    set_active,
    trainable_summary,
    unload,
    unmerge,
)
from .bitfit import BitFitConfig
from .config import DeltaConfig
from .files import load_delta, read_delta_files, save_delta
from .ia3 import IA3Config
from .lora import LoraConfig
from .method import METHODS, method_for
from .prefix import PrefixConfig, PTuningV2Config
from .prompt import PromptConfig
from .ptuning import PTuningConfig


def config_class(method: str) -> type[DeltaConfig]:
    """The config dataclass of ``method`` (``"lora"``, ``"ia3"``, ...)."""
    return method_for(method).config_class


__all__ = [
    "METHODS",
    "AdapterConfig",
    "BitFitConfig",
    "DeltaConfig",
    "DeltaError",
    "IA3Config",
    "LoraConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PrefixConfig",
    "PromptConfig",
    "active",
    "attach",
    "bare",
    "config_class",
    "delta_parameters",
    "deltas",
    "detach",
    "format_summary",
    "freeze_base",
    "head_parameters",
    "load_delta",
    "merge",
    "merge_and_unload",
    "method_for",
    "read_delta_files",
    "route",
    "save_delta",
    "set_active",
    "trainable_summary",
    "unload",
    "unmerge",
]
