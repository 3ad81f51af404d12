"""One config dataclass family, read from and written to Hugging Face ``config.json``.

A config names the architecture (``model_type``) and its sizes. Keys that Hugging Face writes for its own
bookkeeping (``architectures``, ``transformers_version``, ...) are kept in ``extra`` so a round trip loses
nothing; a key a user passes by hand that no field knows is an error, because a typo (``hidden_sise``)
would otherwise silently train the wrong model.

Every field is checked when a config is made: its type against its annotation, its range against the field's
metadata (``field(default=12, metadata={"min": 1, "help": ...})``; keys ``min``, ``max`` and ``above``, the
last exclusive, applied to each number in a list too), so ``num_hidden_layers: -1`` or ``hidden_size: "32"``
is an error naming the field and the value rather than a 0-layer model or a traceback. A new config gets
the checks by declaring its fields so; nothing else is needed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from .errors import ConfigError

#: Keys of ``transformers.PretrainedConfig`` that carry no architecture; kept verbatim in ``extra``.
_HF_BOOKKEEPING = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "id2label",
    "label2id", "problem_type", "gradient_checkpointing", "use_cache", "classifier_dropout", "bos_token_id",
    "eos_token_id", "sep_token_id", "output_past", "return_dict", "output_hidden_states",
    "output_attentions", "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "tie_word_embeddings",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "decoder_start_token_id",
    "num_labels", "_attn_implementation_autoset", "name_or_path",
}


def at_least(default: Any, minimum: float, **metadata: Any) -> Any:
    """A field whose value (or each number in its list) must be at least ``minimum``."""
    return field(default=default, metadata={"min": minimum, **metadata})


def probability(default: float) -> Any:
    """A field holding a probability (a dropout rate): 0 to 1."""
    return field(default=default, metadata={"min": 0, "max": 1})


def check_fields(config: Any, skip: frozenset[str] = frozenset()) -> None:
    """Check every dataclass field of ``config`` (except ``skip``) against its annotation and its metadata's
    range; raises :class:`ConfigError` naming the class, the field and the value."""
    hints = _type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        value, where = getattr(config, f.name), f"{type(config).__name__}.{f.name}"
        expected = hints.get(f.name, Any)
        if not _has_type(value, expected):
            raise ConfigError(f"{where} must be {_describe(expected)}, got {value!r} ({type(value).__name__}): "
                              "fix the value in config.json or where the config is made")
        problem = _out_of_range(value, f.metadata)
        if problem:
            raise ConfigError(f"{where} {problem}: fix the value in config.json or where the config is made")


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """A class's resolved annotations, computed once per class."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _has_type(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_has_type(value, arm) for arm in args)
    if origin is Literal:
        return value in args
    if expected is type(None):
        return value is None
    if origin in (list, tuple):
        inner = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_has_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:  # JSON true is not a size
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, expected) if isinstance(expected, type) else True


_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("true or false", "booleans"), type(None): ("null", "nulls"), dict: ("an object", "objects")}


def _describe(expected: Any, plural: bool = False) -> str:
    """``int | list[int]`` -> "an integer or a list of integers", for error messages."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm, plural) for arm in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return ("lists of " if plural else "a list of ") + (_describe(args[0], True) if args else "values")
    names = _TYPE_NAMES.get(origin or expected)
    return names[plural] if names else getattr(expected, "__name__", str(expected))


def _out_of_range(value: Any, metadata: Any) -> str | None:
    """What is wrong with ``value`` (a number, or a list of them) under ``min`` / ``max`` / ``above``."""
    numbers = list(_numbers(value))
    for bound, fails, says in (("min", lambda x, b: x < b, "at least"), ("max", lambda x, b: x > b, "at most"),
                               ("above", lambda x, b: x <= b, "above")):
        if bound not in metadata:
            continue
        bad = next((x for x in numbers if fails(x, metadata[bound])), None)
        if bad is not None:
            shown = f"{bad!r}" if bad is value else f"{bad!r} (in {value!r})"
            return f"must be {says} {metadata[bound]}, got {shown}"
    return None


def _numbers(value: Any) -> typing.Iterator[int | float]:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


@dataclass
class ModelConfig:
    """Fields shared by every architecture; subclasses add their own and register a ``model_type``.

    Fields are checked on construction (see the module docstring); ``derived`` names fields a subclass computes
    from its own (LED's ``hidden_size`` from ``d_model``): those are checked under their source's name.
    """

    model_type: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[ModelConfig]]] = {}
    derived: ClassVar[frozenset[str]] = frozenset()

    vocab_size: int = at_least(30522, 1)
    hidden_size: int = at_least(768, 1)
    num_hidden_layers: int = at_least(12, 1)
    num_attention_heads: int = at_least(12, 1)
    intermediate_size: int = at_least(3072, 1)
    hidden_act: str = "gelu"
    max_position_embeddings: int = at_least(512, 1)
    initializer_range: float = at_least(0.02, 0)
    pad_token_id: int | None = at_least(0, 0)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("model_type"):
            ModelConfig.registry[cls.model_type] = cls

    def __post_init__(self) -> None:
        check_fields(self, self.derived)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}: pick sizes where hidden_size / heads is a whole number"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        """Labels of a classification head (``id2label`` in HF configs), 2 when unset."""
        id2label = self.extra.get("id2label")
        return len(id2label) if id2label else int(self.extra.get("num_labels", 2))

    @property
    def problem_type(self) -> str | None:
        """HF's ``problem_type`` of a task head: it picks the loss (None: single-label classification)."""
        return self.extra.get("problem_type")

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def create(cls, **kwargs: Any) -> ModelConfig:
        """Build a config from keyword arguments, naming any key no field knows."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            close = ", ".join(sorted(names - {"extra"}))
            raise ConfigError(f"{cls.__name__} has no key(s) {unknown}: known keys are {close}")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Read an HF-style dict; dispatches on ``model_type`` when called on the base class."""
        target = cls
        if cls is ModelConfig or not cls.model_type:
            model_type = data.get("model_type")
            if model_type not in ModelConfig.registry:
                known = ", ".join(sorted(ModelConfig.registry))
                raise ConfigError(
                    f"unknown model_type {model_type!r}: deltaformer supports {known}; check config.json"
                )
            target = ModelConfig.registry[model_type]
        data = target.translate_names(data)
        names = {f.name for f in dataclasses.fields(target) if f.init} - {"extra"}
        known_kwargs = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        target.check_supported(extra)
        try:
            return target(**known_kwargs, extra=extra)
        except TypeError as exc:  # a value of the wrong type reaching __post_init__
            raise ConfigError(f"bad value in {target.__name__} config: {exc}") from exc

    @classmethod
    def translate_names(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config.json's keys under this class's field names (HF's alternative names for a field)."""
        return data

    @classmethod
    def check_supported(cls, extra: dict[str, Any]) -> None:
        """Refuse HF options that would change the math in ways this implementation does not follow."""

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}: pass a model directory holding one")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-download or re-save the model") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object: a model's config.json "
                              "maps names to values; re-download or re-save the model")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        data.update(self.extra)
        data["model_type"] = self.model_type
        return data

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (unknown keys are an error, as in :meth:`create`)."""
        names = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no key(s) {unknown}")
        return dataclasses.replace(self, **changes)


@dataclass
class BertConfig(ModelConfig):
    """BERT (Devlin et al. 2019): token + segment + learned position embeddings, post-LayerNorm blocks."""

    model_type: ClassVar[str] = "bert"

    type_vocab_size: int = at_least(2, 1)
    hidden_dropout_prob: float = probability(0.1)
    attention_probs_dropout_prob: float = probability(0.1)
    layer_norm_eps: float = field(default=1e-12, metadata={"above": 0})

    @classmethod
    def check_supported(cls, extra: dict[str, Any]) -> None:
        kind = extra.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(
                f"position_embedding_type={kind!r} is not supported: deltaformer's BERT uses absolute positions"
            )


@dataclass
class LongformerConfig(BertConfig):
    """Longformer (Beltagy et al. 2020): RoBERTa-style BERT whose attention is a sliding window + global tokens.

    ``attention_window``: Hugging Face's two-sided window (even), one value or one per layer; a layer's
    one-sided window is half of it. ``attention_dilation`` (deltaformer only; Hugging Face ignores it, so keep
    it 1 for checkpoints meant for ``transformers``): one value, or one per layer, each an int or one per head.
    Position ids count from ``pad_token_id + 1``, as in RoBERTa.
    """

    model_type: ClassVar[str] = "longformer"

    pad_token_id: int | None = at_least(1, 0)
    attention_window: int | list[int] = at_least(512, 2)
    attention_dilation: int | list[int | list[int]] = at_least(1, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("attention_window", "attention_dilation"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_hidden_layers:
                raise ConfigError(f"{name} lists {len(value)} values for {self.num_hidden_layers} layers: give one per layer")
        windows = self.attention_window if isinstance(self.attention_window, list) else [self.attention_window]
        if any(w <= 0 or w % 2 for w in windows):
            raise ConfigError(f"attention_window {self.attention_window} must be positive and even (it spans both sides)")

    def window(self, layer: int) -> int:
        """One-sided window of ``layer``."""
        windows = self.attention_window
        return (windows[layer] if isinstance(windows, list) else windows) // 2

    def dilation(self, layer: int) -> int | list[int]:
        """Dilation of ``layer``: one value, or one per head."""
        dilations = self.attention_dilation
        return dilations[layer] if isinstance(dilations, list) else dilations


#: ModelConfig fields an LEDConfig derives from its own (Hugging Face's names), and never writes out.
_LED_ALIASES = {
    "hidden_size": "d_model", "num_hidden_layers": "encoder_layers", "num_attention_heads": "encoder_attention_heads",
    "intermediate_size": "encoder_ffn_dim", "hidden_act": "activation_function",
    "max_position_embeddings": "max_encoder_position_embeddings", "initializer_range": "init_std",
}


def _derived(default: Any, from_field: str) -> Any:
    """A ModelConfig field an LED config computes from its own field ``from_field`` (never given)."""
    return field(default=default, init=False, metadata={"help": f"the same as {from_field} (derived)"})


@dataclass
class LEDConfig(ModelConfig):
    """LED (Beltagy et al. 2020): a Longformer encoder and a full-attention decoder with cross-attention,
    under Hugging Face's field names (``d_model``, ``encoder_layers``, ...).

    The shared ModelConfig names (``hidden_size``, ``num_hidden_layers``, ...) are derived from those and
    cannot be given, so a ``hidden_size`` can never silently lose to ``d_model``; reading a config.json
    that uses them translates them as Hugging Face's ``attribute_map`` does, and writing leaves them out.
    """

    model_type: ClassVar[str] = "led"
    derived: ClassVar[frozenset[str]] = frozenset(_LED_ALIASES)

    hidden_size: int = _derived(1024, "d_model")
    num_hidden_layers: int = _derived(12, "encoder_layers")
    num_attention_heads: int = _derived(16, "encoder_attention_heads")
    intermediate_size: int = _derived(4096, "encoder_ffn_dim")
    hidden_act: str = _derived("gelu", "activation_function")
    max_position_embeddings: int = _derived(16384, "max_encoder_position_embeddings")
    initializer_range: float = _derived(0.02, "init_std")

    vocab_size: int = at_least(50265, 1)
    d_model: int = at_least(1024, 1)
    encoder_layers: int = at_least(12, 1)
    decoder_layers: int = at_least(12, 1)
    encoder_attention_heads: int = at_least(16, 1)
    decoder_attention_heads: int = at_least(16, 1)
    encoder_ffn_dim: int = at_least(4096, 1)
    decoder_ffn_dim: int = at_least(4096, 1)
    max_encoder_position_embeddings: int = at_least(16384, 1)
    max_decoder_position_embeddings: int = at_least(1024, 1)
    activation_function: str = "gelu"
    dropout: float = probability(0.1)
    attention_dropout: float = probability(0.0)
    init_std: float = at_least(0.02, 0)
    attention_window: int | list[int] = at_least(512, 2)
    attention_dilation: int | list[int | list[int]] = at_least(1, 1)
    pad_token_id: int | None = at_least(1, 0)
    bos_token_id: int = at_least(0, 0)
    eos_token_id: int = at_least(2, 0)
    decoder_start_token_id: int = at_least(2, 0)

    def __post_init__(self) -> None:
        for ours, theirs in _LED_ALIASES.items():
            setattr(self, ours, getattr(self, theirs))
        super().__post_init__()
        if self.d_model % self.decoder_attention_heads:
            raise ConfigError(f"d_model {self.d_model} is not a multiple of decoder_attention_heads "
                              f"{self.decoder_attention_heads}")
        self.encoder_config()  # checks the windows

    @classmethod
    def translate_names(cls, data: dict[str, Any]) -> dict[str, Any]:
        """HF's generic names (``hidden_size``, ...) in a config.json mean LED's own (``d_model``, ...), as
        in Hugging Face's ``attribute_map``; where a file has both, LED's own name is the one read."""
        data = dict(data)
        for ours, theirs in _LED_ALIASES.items():
            if ours in data:
                data.setdefault(theirs, data.pop(ours))
        return data

    @classmethod
    def check_supported(cls, extra: dict[str, Any]) -> None:
        for key in ("activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
            if extra.get(key, 0.0):
                raise ConfigError(f"{key}={extra[key]} is not supported: deltaformer's LED trains without it (set 0)")

    @property
    def pad_id(self) -> int:
        """``pad_token_id``, which LED's decoding needs (labels shifted right, ended rows)."""
        if self.pad_token_id is None:
            raise ConfigError("LED needs pad_token_id in its config: set it (LED checkpoints use 1)")
        return self.pad_token_id

    def encoder_config(self) -> LongformerConfig:
        """The encoder as a Longformer config (its layers are Longformer layers)."""
        return LongformerConfig(
            vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.encoder_layers,
            num_attention_heads=self.encoder_attention_heads, intermediate_size=self.encoder_ffn_dim,
            hidden_act=self.activation_function, hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.attention_dropout, layer_norm_eps=1e-5, pad_token_id=self.pad_token_id,
            attention_window=self.attention_window, attention_dilation=self.attention_dilation,
        )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for alias in _LED_ALIASES:
            data.pop(alias)
        return data


#: ModelConfig fields a TransformerConfig derives from torch.nn.Transformer's names, and never writes out.
_TRANSFORMER_ALIASES = {
    "hidden_size": "d_model", "num_hidden_layers": "num_encoder_layers", "num_attention_heads": "nhead",
    "intermediate_size": "dim_feedforward", "hidden_act": "activation",
}


@dataclass
class TransformerConfig(ModelConfig):
    """The original encoder-decoder Transformer (Vaswani et al. 2017), under ``torch.nn.Transformer``'s names.

    One vocabulary for source and target (the paper shares the two embedding tables and, with
    ``tie_word_embeddings``, the output projection); sinusoidal positions up to ``max_position_embeddings`` on
    either side; post-LayerNorm layers with a ReLU feed-forward. ``final_norm`` adds the LayerNorm after each
    stack that ``torch.nn.Transformer`` has (the paper has none). ``label_smoothing`` shapes the training loss.
    """

    model_type: ClassVar[str] = "transformer"
    derived: ClassVar[frozenset[str]] = frozenset({*_TRANSFORMER_ALIASES, "initializer_range"})

    hidden_size: int = _derived(512, "d_model")
    num_hidden_layers: int = _derived(6, "num_encoder_layers")
    num_attention_heads: int = _derived(8, "nhead")
    intermediate_size: int = _derived(2048, "dim_feedforward")
    hidden_act: str = _derived("relu", "activation")
    initializer_range: float = field(default=0.0, init=False, metadata={"help": "d_model ** -0.5 (derived): the "
                                                                        "embeddings' init std"})

    vocab_size: int = at_least(32000, 1, help="tokens in the shared source/target vocabulary")
    d_model: int = at_least(512, 1, help="hidden size")
    nhead: int = at_least(8, 1, help="attention heads")
    num_encoder_layers: int = at_least(6, 1, help="encoder layers")
    num_decoder_layers: int = at_least(6, 1, help="decoder layers")
    dim_feedforward: int = at_least(2048, 1, help="feed-forward width")
    activation: str = field(default="relu", metadata={"help": "feed-forward activation"})
    dropout: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "dropout on the embeddings + "
                                                  "positions and on each sub-layer's output"})
    attention_dropout: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "dropout on attention "
                                                            "weights (torch.nn.Transformer uses `dropout`)"})
    layer_norm_eps: float = field(default=1e-5, metadata={"above": 0, "help": "LayerNorm epsilon"})
    max_position_embeddings: int = at_least(1024, 1, help="longest source or target (sinusoidal positions)")
    final_norm: bool = field(default=True, metadata={"help": "a LayerNorm after each stack, as torch.nn.Transformer"})
    scale_embeddings: bool = field(default=True, metadata={"help": "multiply embeddings by sqrt(d_model)"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "output projection = the embeddings"})
    label_smoothing: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "of the training loss"})
    pad_token_id: int = at_least(0, 0, help="padding token")
    bos_token_id: int = at_least(1, 0, help="beginning-of-sequence token")
    eos_token_id: int = at_least(2, 0, help="end-of-sequence token: generation stops there")
    decoder_start_token_id: int = at_least(1, 0, help="the decoder's first input")

    def __post_init__(self) -> None:
        for ours, theirs in _TRANSFORMER_ALIASES.items():
            setattr(self, ours, getattr(self, theirs))
        self.initializer_range = self.d_model ** -0.5
        super().__post_init__()
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ConfigError(f"TransformerConfig.{name} {getattr(self, name)} is outside the vocabulary "
                                  f"(vocab_size {self.vocab_size})")

    @property
    def max_decoder_position_embeddings(self) -> int:
        """The decoder's context window (generation reads it): the same positions as the encoder's."""
        return self.max_position_embeddings

    @classmethod
    def translate_names(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for ours, theirs in _TRANSFORMER_ALIASES.items():
            if ours in data:
                data.setdefault(theirs, data.pop(ours))
        data.pop("initializer_range", None)
        return data

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for alias in self.derived:
            data.pop(alias)
        return data


def load_config(path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a model directory (or the file itself) into the right config class."""
    return ModelConfig.from_file(path)


#: Keys each scaling kind needs in ``rope_scaling``.
SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def scaling_kind(scaling: dict[str, Any] | None) -> str:
    """The kind a ``rope_scaling`` dict names (``rope_type``, or the older ``type``), checked."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SCALING_KEYS:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported: use one of {', '.join(SCALING_KEYS)}")
    missing = [k for k in SCALING_KEYS[kind] if k not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {kind!r} lacks {', '.join(missing)}: add them to config.json")
    if kind != "default" and not float(scaling["factor"]) > 0:
        raise ConfigError(f"rope_scaling factor must be above 0, got {scaling['factor']!r}")
    return kind


#: ModelConfig fields a GPT2Config derives from Hugging Face's GPT-2 names, and never writes out.
_GPT2_ALIASES = {
    "hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    "hidden_act": "activation_function", "max_position_embeddings": "n_positions",
}


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm decoder blocks, head tied to the token
    embeddings; under Hugging Face's field names (``n_embd``, ``n_layer``, ...), the shared ModelConfig
    fields derived from them."""

    model_type: ClassVar[str] = "gpt2"
    derived: ClassVar[frozenset[str]] = frozenset({*_GPT2_ALIASES, "intermediate_size"})

    vocab_size: int = at_least(50257, 1, help="tokens in the vocabulary")
    n_positions: int = at_least(1024, 1, help="longest sequence (learned position embeddings)")
    n_embd: int = at_least(768, 1, help="hidden size")
    n_layer: int = at_least(12, 1, help="decoder blocks")
    n_head: int = at_least(12, 1, help="attention heads")
    n_inner: int | None = at_least(None, 1, help="MLP width; null means 4 * n_embd")
    activation_function: str = field(default="gelu_new", metadata={"help": "MLP activation (HF name)"})
    resid_pdrop: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "dropout on each block's outputs"})
    embd_pdrop: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "dropout on the embeddings"})
    attn_pdrop: float = field(default=0.1, metadata={"min": 0, "max": 1, "help": "dropout on attention weights"})
    layer_norm_epsilon: float = field(default=1e-5, metadata={"above": 0, "help": "LayerNorm epsilon"})
    scale_attn_weights: bool = field(default=True, metadata={"help": "divide scores by sqrt(head_dim)"})
    scale_attn_by_inverse_layer_idx: bool = field(
        default=False, metadata={"help": "also divide layer i's scores by i + 1"})
    reorder_and_upcast_attn: bool = field(
        default=False, metadata={"help": "HF computes scores in fp32 (same result in fp32 runs)"})
    bos_token_id: int | None = at_least(50256, 0, help="beginning-of-text token")
    eos_token_id: int | list[int] | None = at_least(50256, 0, help="end-of-text token(s): generation stops there")
    pad_token_id: int | None = at_least(None, 0, help="padding token; null: none (GPT-2 has none)")
    tie_word_embeddings: bool = field(default=True, metadata={"help": "LM head shares the token embeddings"})

    def __post_init__(self) -> None:
        for ours, theirs in _GPT2_ALIASES.items():
            setattr(self, ours, getattr(self, theirs))
        self.intermediate_size = self.n_inner or 4 * self.n_embd
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for alias in self.derived:
            data.pop(alias)
        return data


@dataclass
class LlamaConfig(ModelConfig):
    """The Llama family (Llama 2/3, SmolLM, TinyLlama, ...): RoPE, RMSNorm, SwiGLU MLP, grouped-query
    attention, tied or untied head; under Hugging Face's field names.

    ``rope_scaling`` is one of the kinds :mod:`deltaformer.nn.rope` implements. Newer ``transformers`` writes
    ``rope_parameters`` (theta and scaling in one dict): it is read into ``rope_theta`` / ``rope_scaling``, and
    written back in the older form, which every ``transformers`` version reads.
    """

    model_type: ClassVar[str] = "llama"

    vocab_size: int = at_least(32000, 1, help="tokens in the vocabulary")
    hidden_size: int = at_least(4096, 1, help="hidden size")
    intermediate_size: int = at_least(11008, 1, help="SwiGLU MLP width")
    num_hidden_layers: int = at_least(32, 1, help="decoder blocks")
    num_attention_heads: int = at_least(32, 1, help="query heads")
    num_key_value_heads: int | None = at_least(None, 1, help="key/value heads (grouped-query attention); "
                                               "null: as many as query heads")
    head_dim: int | None = at_least(None, 1, help="width of a head; null: hidden_size / num_attention_heads")  # type: ignore[assignment]  # field over the base property; None only until __post_init__
    hidden_act: str = field(default="silu", metadata={"help": "gate activation (silu: SwiGLU)"})
    max_position_embeddings: int = at_least(2048, 1, help="context window")
    rms_norm_eps: float = field(default=1e-6, metadata={"above": 0, "help": "RMSNorm epsilon"})
    rope_theta: float = field(default=10000.0, metadata={"above": 0, "help": "RoPE base wavelength"})
    rope_scaling: dict[str, Any] | None = field(
        default=None, metadata={"help": "RoPE frequency scaling: rope_type linear, dynamic or llama3 and its keys"})
    attention_bias: bool = field(default=False, metadata={"help": "biases on the q/k/v/o projections"})
    attention_dropout: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "dropout on attention weights"})
    mlp_bias: bool = field(default=False, metadata={"help": "biases on the MLP projections"})
    pretraining_tp: int | None = at_least(1, 1, help="HF bookkeeping (tensor-parallel slices); no effect on math")
    bos_token_id: int | None = at_least(1, 0, help="beginning-of-sequence token")
    eos_token_id: int | list[int] | None = at_least(2, 0, help="end-of-sequence token(s): generation stops there")
    pad_token_id: int | None = at_least(None, 0, help="padding token; null: none")
    tie_word_embeddings: bool = field(default=False, metadata={"help": "LM head shares the token embeddings"})

    def __post_init__(self) -> None:
        params = self.extra.get("rope_parameters")
        if isinstance(params, dict):
            self.extra = {k: v for k, v in self.extra.items() if k != "rope_parameters"}
            params = dict(params)
            self.rope_theta = float(params.pop("rope_theta", self.rope_theta))
            kind = params.get("rope_type", params.get("type", "default"))
            self.rope_scaling = params if kind != "default" else None
        if isinstance(self.rope_theta, int) and not isinstance(self.rope_theta, bool):
            self.rope_theta = float(self.rope_theta)
        super().__post_init__()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}: each key/value head serves a "
                              "whole group of query heads")
        scaling_kind(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["rope_scaling"] is None:
            data.pop("rope_scaling")
        return data
