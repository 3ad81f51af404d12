"""Generation settings: one dataclass, checked on construction like every other config.

Defaults follow ``transformers.GenerationConfig`` (greedy, ``top_k=50`` once sampling is on, no penalty), so
the same settings mean the same search in both libraries. ``eos_token_id`` and ``pad_token_id`` left unset
are taken from the model's config by :meth:`GenerationConfig.resolved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import check_fields
from ..errors import ConfigError


@dataclass
class GenerationConfig:
    """How to continue a prompt: the search, its sampling filters, and when to stop."""

    max_new_tokens: int = field(default=20, metadata={"min": 1, "help": "tokens to generate at most"})
    do_sample: bool = field(default=False, metadata={"help": "sample from the filtered distribution (else argmax)"})
    temperature: float = field(default=1.0, metadata={"min": 0, "help": "divide logits by this when sampling; "
                                                      "0 means greedy"})
    top_k: int = field(default=50, metadata={"min": 0, "help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"above": 0, "max": 1, "help": "sample from the smallest set of "
                                                "tokens whose probability reaches p (1: all)"})
    min_p: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "drop tokens less likely than "
                                                        "min_p times the most likely one"})
    repetition_penalty: float = field(default=1.0, metadata={"above": 0, "help": "divide (or multiply, when "
                                                             "negative) the logits of tokens already seen"})
    num_beams: int = field(default=1, metadata={"min": 1, "help": "beam search with this many beams (1: none)"})
    length_penalty: float = field(default=1.0, metadata={"help": "beam score = sum log p / length ** this"})
    early_stopping: bool | Literal["never"] = field(default=False, metadata={
        "help": "beam search: True stops at num_beams finished hypotheses, False when none can improve, 'never' "
                "judges at the longest length"})
    eos_token_id: int | list[int] | None = field(default=None, metadata={"min": 0, "help": "token(s) that end a "
                                                                         "sequence (default: the model's)"})
    pad_token_id: int | None = field(default=None, metadata={"min": 0, "help": "fills finished rows (default: the "
                                                             "model's, else the first eos)"})
    stop_strings: list[str] | None = field(default=None, metadata={"help": "text that ends a sequence once "
                                                                   "generated (needs the tokenizer)"})
    seed: int | None = field(default=None, metadata={"min": 0, "help": "seed of the sampling generator (each row "
                                                     "gets its own, so a row samples alike alone or batched)"})
    truncate_prompt: bool = field(default=False, metadata={"help": "cut a prompt longer than the context window "
                                                           "from the left (with a warning) instead of refusing it"})

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        check_fields(self)
        if self.stop_strings is not None and not all(self.stop_strings):
            raise ConfigError("GenerationConfig.stop_strings must not hold an empty string: remove it")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam sampling is not supported: use num_beams=1 with do_sample=True, or do_sample=False")

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random (``temperature=0`` is greedy, as in llama.cpp and OpenAI)."""
        return self.do_sample and self.temperature > 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(cls, config: GenerationConfig | None = None, **settings: Any) -> GenerationConfig:
        """``config`` (default: all defaults) with ``settings`` applied; a key no field knows is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {unknown}: known are {', '.join(sorted(names))}")
        return dataclasses.replace(config, **settings) if config is not None else cls(**settings)

    def resolved(self, model_config: Any) -> GenerationConfig:
        """Fill unset eos/pad from the model's config (HF: pad falls back to the first eos)."""
        eos = self.eos_token_id
        if eos is None:
            eos = getattr(model_config, "eos_token_id", None)
            if eos is None:
                eos = (getattr(model_config, "extra", None) or {}).get("eos_token_id")
        pad = self.pad_token_id
        if pad is None:
            pad = getattr(model_config, "pad_token_id", None)
        if pad is None:
            eos_list = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
            pad = eos_list[0] if eos_list else None
        return dataclasses.replace(self, eos_token_id=eos, pad_token_id=pad)
