"""What every assembled model shares: outputs, loading Hugging Face checkpoints exactly, saving them back.

A model class declares its config class, the HF architecture name, and a :class:`NameMap` from HF
parameter names to its own. Loading translates names, checks every shape, and says clearly which weights
were missing (and freshly initialised) or left unused, so a user never trains a half-loaded model unawares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from ..checkpoints.gguf import deferred_init, find_gguf, load_into, open_gguf
from ..checkpoints.io import load_state_dict, save_state_dict
from ..checkpoints.names import NameMap, normalize_legacy
from ..checkpoints.report import LoadReport
from ..config import ModelConfig, load_config
from ..errors import CheckpointError, ConfigError, DeltaError

log = logging.getLogger("deltaformer")


class Output:
    """Model outputs: attribute access, ``out["name"]`` and tuple-style ``out[0]`` over the non-None fields."""

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)  # type: ignore[arg-type]  # subclasses are dataclasses

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]  # subclasses are dataclasses


@dataclass
class EncoderOutput(Output):
    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class HeadOutput(Output):
    """Output of a model with a task head: ``logits`` and, when labels were given, ``loss``."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    extra_logits: dict[str, Tensor] = field(default_factory=dict)


class PreTrainedModel(nn.Module):
    """Base of assembled models; subclasses set the class attributes below."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    hf_architecture: ClassVar[str] = ""
    #: HF prefix of the backbone inside HF task models ("bert."), ours is "backbone.".
    hf_backbone_prefix: ClassVar[str] = ""
    #: Our parameter names that may be absent from a checkpoint without harm (a fresh head is expected).
    head_prefixes: ClassVar[tuple[str, ...]] = ()
    #: HF names that are derived from others (tied) or stateless buffers; never needed, never saved.
    hf_ignored: ClassVar[tuple[str, ...]] = ()

    #: Every model class by its HF architecture name, for :func:`deltaformer.models.auto.load_model`.
    registry: ClassVar[dict[str, type[PreTrainedModel]]] = {}
    #: The router of attached deltas (a ``deltaformer.delta.routing.DeltaRouter``, set by ``delta.attach``).
    delta_router: Any = None
    #: What loading the checkpoint did (set by :meth:`from_pretrained`).
    load_report: LoadReport
    #: The input hook of prompt-based deltas, on backbones that run one (see :meth:`delta_backbone`).
    prompt: nn.Module | None
    #: Paths of this model's own layer stacks (``nn.ModuleList``s) that gradient checkpointing recomputes layer by
    #: layer (:func:`set_gradient_checkpointing`); a task model leaves it to its backbone.
    checkpoint_stacks: ClassVar[tuple[str, ...]] = ()
    #: Whether gradient checkpointing is on (set by :func:`set_gradient_checkpointing`; heads may read it).
    checkpointing: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("hf_architecture"):
            PreTrainedModel.registry[cls.hf_architecture] = cls

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # --- names ----------------------------------------------------------------------------------

    @classmethod
    def backbone_name_map(cls) -> NameMap:
        """HF <-> ours for the bare backbone (no prefixes)."""
        raise NotImplementedError

    @classmethod
    def name_map(cls) -> NameMap:
        """HF <-> ours for this class's whole state dict; task models add their head rules."""
        return cls.backbone_name_map()

    def is_backbone(self) -> bool:
        return not hasattr(self, "backbone")

    @classmethod
    def is_bare_class(cls) -> bool:
        """True for backbone classes (no task head), which HF names ``<Arch>Model``."""
        return cls.hf_architecture.endswith("Model") and "For" not in cls.hf_architecture

    # --- what deltas need (deltaformer.delta.host.DeltaHost) ------------------------------------

    def delta_backbone(self) -> PreTrainedModel | None:
        """The encoder that runs the layers and the ``prompt`` input hook: the model itself for a backbone
        that has one, its backbone for a task model; None (the default) refuses input-side deltas."""
        return None

    def prompt_hook(self) -> nn.Module | None:
        backbone = self.delta_backbone()
        if backbone is None:
            return None
        return backbone.prompt if backbone is self else backbone.prompt_hook()

    def set_prompt_hook(self, hook: nn.Module | None) -> None:
        backbone = self.delta_backbone()
        if backbone is None:
            raise DeltaError(f"{type(self).__name__} runs no input hook: prompt-based deltas need an encoder that "
                             "does (BERT, Longformer)")
        if backbone is self:
            self.prompt = hook
        else:
            backbone.set_prompt_hook(hook)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (the backbone's for a task model)."""
        backbone = self.delta_backbone()
        if backbone is None or backbone is self:
            raise NotImplementedError(f"{type(self).__name__} does not say which module embeds its tokens")
        return backbone.get_input_embeddings()

    # --- init -------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """BERT-style init: normal(0, initializer_range) for linears and embeddings, ones/zeros for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, log_report: bool = True, keep_packed: bool = False,
                        **config_changes: Any) -> Self:
        """Load an HF model directory (or a known asset name) with exact weights.

        ``config_changes`` override config fields, e.g. ``num_labels`` via ``extra`` or dropout rates.
        ``log_report=False`` leaves reporting missing weights to a caller that loads them next (``load_report``).
        ``keep_packed`` (GGUF files only) keeps quantized linears and embeddings packed (``quant.gguf_linear``).
        """
        path = resolve_path(name_or_path)
        from ..quant.files import is_quantized, load_quantized

        if is_quantized(path):  # a `deltaformer quantize` directory: its layers stay packed
            return load_quantized(cls, path, read_config(path), **config_changes)
        gguf = find_gguf(path)
        checkpoint = open_gguf(gguf) if gguf is not None else None
        config = read_config(path)
        if not isinstance(config, cls.config_class):
            raise ConfigError(
                f"{path} holds a {config.model_type!r} model; {cls.__name__} needs {cls.config_class.model_type!r}"
            )
        num_labels = config_changes.pop("num_labels", None)
        if config_changes:
            config = config.replace(**config_changes)
        if num_labels is not None and num_labels != config.num_labels:
            config.extra = {**config.extra, "num_labels": num_labels}
            config.extra.pop("id2label", None)
            config.extra.pop("label2id", None)
        if checkpoint is not None:  # built uninitialised, each tensor unpacked into place (checkpoints.gguf)
            with deferred_init() as pending:
                model = cls(config)
            report = load_into(model, checkpoint, keep_packed=keep_packed, pending_init=pending)
        elif keep_packed:
            raise CheckpointError(f"keep_packed=True needs a GGUF file; {path} is not one")
        else:
            model = cls(config)
            report = model.load_hf_state_dict(load_state_dict(path))
        if log_report and (report.missing or report.unexpected):
            log.warning("loading %s into %s: %s", path, cls.__name__, report)
        model.load_report = report
        return model.eval()

    def load_hf_state_dict(self, state: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                           strict: bool = True) -> LoadReport:
        """Load HF-named weights; shape mismatches and missing backbone weights are errors.

        ``state`` is a dict or an iterator of ``(name, tensor)`` pairs; each tensor is copied into the model as it
        comes, so a streamed checkpoint (GGUF) is never held whole beside the model.
        """
        name_map = self.name_map()
        ours = self.state_dict()
        translated: set[str] = set()
        unexpected: list[str] = []
        streamed = not isinstance(state, Mapping)
        staged: dict[str, Tensor] = {}  # a dict is checked whole before anything is copied
        for raw_name, tensor in state.items() if isinstance(state, Mapping) else state:
            name = self.hf_name_for_this_class(normalize_legacy(raw_name), name_map)
            if any(name.endswith(ignored) for ignored in self.hf_ignored):
                continue
            mine = name_map.to_ours(name)
            if mine is None or mine not in ours:
                unexpected.append(raw_name)
                continue
            if tuple(tensor.shape) != tuple(ours[mine].shape):
                raise CheckpointError(
                    f"checkpoint weight {raw_name} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(ours[mine].shape)}: the checkpoint's config.json does not match its weights"
                )
            if streamed:
                with torch.no_grad():
                    ours[mine].copy_(tensor)
            else:
                staged[mine] = tensor
            translated.add(mine)
        missing = [k for k in ours if k not in translated and not self._derived(k)]
        fatal = [k for k in missing if not k.startswith(self.head_prefixes)]
        if fatal and strict:
            raise CheckpointError(
                f"checkpoint lacks {len(fatal)} weight(s) of {type(self).__name__}, e.g. {fatal[0]}: "
                "is it a checkpoint of this architecture? (pass strict=False to initialise them fresh)"
            )
        with torch.no_grad():
            for mine, tensor in staged.items():
                ours[mine].copy_(tensor)
        return LoadReport(missing=missing, unexpected=unexpected)

    def _derived(self, name: str) -> bool:
        """Parameters that are views of others (tied) do not need to be loaded."""
        return name in self.tied_parameters()

    def tied_parameters(self) -> set[str]:
        return set()

    def hf_name_for_this_class(self, name: str, name_map: NameMap) -> str:
        """Add or strip HF's backbone prefix so bare and task checkpoints both load into either class."""
        prefix = self.hf_backbone_prefix
        if self.is_backbone():
            return name[len(prefix):] if prefix and name.startswith(prefix) else name
        if name.startswith(prefix) or name_map.to_ours(name) is not None:
            return name
        return prefix + name

    # --- saving -----------------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Our weights under HF names, without tied copies."""
        name_map = self.name_map()
        tied = self.tied_parameters()
        out = {}
        for name, tensor in self.state_dict().items():
            if name in tied:
                continue
            hf = name_map.to_hf(name)
            if hf is None:
                raise CheckpointError(f"no HF name for parameter {name}: extend {type(self).__name__}.name_map")
            out[hf] = tensor
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads with the same outputs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config
        config.extra = {**config.extra, "architectures": [self.hf_architecture]}
        config.save(directory)
        save_state_dict(self.hf_state_dict(), directory / "model.safetensors")
        return directory

    # --- gradient checkpointing -----------------------------------------------------------------

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward instead of keeping its activations (HF's method name; see
        :func:`set_gradient_checkpointing`)."""
        set_gradient_checkpointing(self, True)

    def gradient_checkpointing_disable(self) -> None:
        set_gradient_checkpointing(self, False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpointing

    def layer_stack(self, path: str) -> nn.ModuleList:
        """The ``nn.ModuleList`` at ``path`` (one of :attr:`checkpoint_stacks`)."""
        stack = self.get_submodule(path)
        if not isinstance(stack, nn.ModuleList):
            raise TypeError(f"{type(self).__name__}.{path} is a {type(stack).__name__}, not a ModuleList of layers")
        return stack

    # --- sizes ------------------------------------------------------------------------------------

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def set_gradient_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Turn gradient checkpointing on (or off) for every deltaformer model in ``model`` (``model`` itself may be any
    module holding one, a prompting wrapper say): the layers of each declared :attr:`~PreTrainedModel.checkpoint_stacks`
    run through :func:`deltaformer.nn.checkpointing.checkpoint_layers`, recomputed under the delta router's state
    of their forward, and heads that read :attr:`~PreTrainedModel.checkpointing` (a causal LM's vocabulary
    projection and loss) work in chunks. Any delta and a quantized base train the same way, with the same
    gradients. Returns the number of layers; a model without a layer stack is refused when enabling."""
    from ..nn.checkpointing import checkpoint_layers

    hosts = [m for m in model.modules() if isinstance(m, PreTrainedModel)]

    def routing_state() -> Any:
        for host in hosts:  # the router lives on the model deltas were attached to
            router = host.__dict__.get("delta_router")
            if router is not None:
                return router.snapshot()
        return nullcontext

    count = sum(checkpoint_layers(host.layer_stack(path), enable, routing_state)
                for host in hosts for path in host.checkpoint_stacks)
    if enable and not count:
        raise ConfigError(f"{type(model).__name__} has no layer stack to checkpoint (gradient checkpointing works "
                          "on BERT-family encoders and GPT-2 / Llama decoders)")
    for host in hosts:
        host.checkpointing = enable
    return count


def read_config(path: Path) -> ModelConfig:
    """The config of a resolved checkpoint: its ``config.json``, or a GGUF file's metadata."""
    gguf = find_gguf(path)
    return ModelConfig.from_dict(open_gguf(gguf).hf_config()) if gguf is not None else load_config(path)


def resolve_path(name_or_path: str | Path) -> Path:
    """A model directory, a GGUF file, or a known asset name fetched on first use."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir() and path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file; expected a model directory (the folder holding config.json "
                                  f"and the weights): pass {path.parent}")
        return path
    try:
        from ..data.assets import resolve_model_path
    except ImportError:  # pragma: no cover - assets module always ships
        raise CheckpointError(f"model path {path} does not exist") from None
    return resolve_model_path(str(name_or_path))
