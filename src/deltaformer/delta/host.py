"""What a model must offer to carry deltas (:class:`DeltaHost`), and finding a model's router.

Delta code never guesses at a model's attributes: it reaches a model only through the members below,
which every :class:`~deltaformer.models.base.PreTrainedModel` implements (the bare backbones and the task
models alike). A new architecture carries every delta method once it implements them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn

from ..checkpoints.names import NameMap
from ..config import ModelConfig
from ..errors import DeltaError
from .parts import StackedDelta
from .routing import DeltaRouter
from .wrappers import DeltaWrapper


@runtime_checkable
class DeltaHost(Protocol):
    """A model that can carry deltas.

    * ``delta_router``: the :class:`DeltaRouter` of its deltas (None until the first attach);
    * ``hf_architecture``, ``hf_backbone_prefix`` (``"bert."``), ``head_prefixes`` (``("classifier.",)``:
      the task head, trained and saved with every delta), ``name_map()`` and ``hf_name_for_this_class()``:
      module names as Hugging Face and peft write them, for delta files and peft's target names;
    * ``delta_backbone()``: the encoder (or decoder) that runs the layers and the ``prompt`` input hook,
      or None when the model has none (input-side deltas are then refused); ``prompt_hook()`` /
      ``set_prompt_hook()`` read and replace that hook, ``get_input_embeddings()`` is its token table;
    * ``config``: its :class:`~deltaformer.config.ModelConfig` (sizes, ``max_position_embeddings``).
    """

    delta_router: Any
    config: ModelConfig
    hf_architecture: ClassVar[str]
    hf_backbone_prefix: ClassVar[str]
    head_prefixes: ClassVar[tuple[str, ...]]

    @classmethod
    def name_map(cls) -> NameMap: ...

    def hf_name_for_this_class(self, name: str, name_map: NameMap) -> str: ...

    def delta_backbone(self) -> DeltaHost | None: ...

    def prompt_hook(self) -> nn.Module | None: ...

    def set_prompt_hook(self, hook: nn.Module | None) -> None: ...

    def get_input_embeddings(self) -> nn.Embedding: ...

    def modules(self) -> Iterator[nn.Module]: ...


def as_host(model: nn.Module) -> DeltaHost:
    """``model`` as a :class:`DeltaHost`, or a clear error naming what it lacks."""
    if isinstance(model, DeltaHost):
        return model
    raise DeltaError(f"{type(model).__name__} cannot carry deltas: pass a deltaformer model (BertModel, "
                     "BertForSequenceClassification, ...), which implements deltaformer.delta.host.DeltaHost")


def host_or_none(model: nn.Module) -> DeltaHost | None:
    return model if isinstance(model, DeltaHost) else None


def backbone_of(model: nn.Module) -> DeltaHost:
    """The module that owns the input ``prompt`` hook and the layers (the model itself or its backbone)."""
    backbone = as_host(model).delta_backbone()
    if backbone is None:
        raise DeltaError(f"{type(model).__name__} has no backbone with an input hook: prompt-based deltas need one")
    return backbone


def _own_router(module: nn.Module) -> DeltaRouter | None:
    """``module.delta_router``: declared by every :class:`DeltaHost`, set by :func:`get_router` on any module."""
    router = module.__dict__.get("delta_router")
    return router if isinstance(router, DeltaRouter) else None


def find_router(model: nn.Module) -> DeltaRouter | None:
    """The router of the deltas on ``model`` or inside it (a backbone of a task model with deltas)."""
    own = _own_router(model)
    if own is not None:
        return own
    for module in model.modules():
        if isinstance(module, (StackedDelta, DeltaWrapper)):
            return module.router
        own = _own_router(module)
        if own is not None:
            return own
    return None


def get_router(model: nn.Module) -> DeltaRouter:
    """The model's router, created on first use (kept as ``model.delta_router``). Any module may carry
    deltas on its linears and norms; only a :class:`DeltaHost` offers HF names, heads and the prompt hook."""
    router = find_router(model) or DeltaRouter()
    model.__dict__["delta_router"] = router  # a plain attribute, never a submodule or state-dict entry
    return router


def require_router(model: nn.Module) -> DeltaRouter:
    router = find_router(model)
    if router is None or not router.deltas:
        raise DeltaError("this model has no deltas attached: attach one with deltaformer.delta.attach(model, config)")
    return router


def drop_router(model: nn.Module, router: DeltaRouter) -> None:
    """Forget ``router`` on every model inside ``model`` (after unloading all deltas)."""
    for module in model.modules():
        if _own_router(module) is router:
            del module.__dict__["delta_router"]
