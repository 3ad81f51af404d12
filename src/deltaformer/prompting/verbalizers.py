"""Verbalizers: each class of a task named by one or more label words, possibly several tokens long.

Written as JSON, inline or in a file: ``{"negative": ["terrible", "bad"], "positive": "great"}`` (a class to
a word or a list of words), or a list of words in the task's label order. A word is scored by its tokens'
log-probabilities (:mod:`deltaformer.prompting.scoring`); a class by reducing its words' scores
(``mean``, ``max`` or ``logsumexp``, the last the log of the summed probabilities).

The verbalizer must name exactly the task's classes: a missing class could never be predicted and an extra
one is a typo, so both are refused, as is a word that tokenizes to nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PromptError

CLASS_REDUCTIONS = ("mean", "max", "logsumexp")


@dataclass(frozen=True)
class Verbalizer:
    """``words[i]``: the label words of class ``labels[i]`` (the task's label order)."""

    labels: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]
    class_reduce: str = "mean"

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.words):
            raise PromptError(f"verbalizer has {len(self.words)} word lists for {len(self.labels)} classes")
        if self.class_reduce not in CLASS_REDUCTIONS:
            raise PromptError(f"unknown class reduction {self.class_reduce!r}: use one of "
                              f"{', '.join(CLASS_REDUCTIONS)}")
        for label, words in zip(self.labels, self.words):
            if not words:
                raise PromptError(f"verbalizer class {label!r} has no label word: give at least one")
            for word in words:
                if not isinstance(word, str) or not word.strip():
                    raise PromptError(f"verbalizer class {label!r} has an empty label word {word!r}: remove it or "
                                      "write a word")

    @classmethod
    def parse(cls, spec: str | Path | dict[str, Any] | Sequence[Any], labels: Sequence[str],
              class_reduce: str = "mean") -> Verbalizer:
        """From a JSON string, a path to a JSON file, a dict or a list, checked against the task's ``labels``."""
        data = _load(spec) if isinstance(spec, str | Path) else spec
        labels = tuple(labels)
        if isinstance(data, dict):
            missing = [label for label in labels if label not in data]
            extra = [str(k) for k in data if k not in labels]
            if missing:
                raise PromptError(f"verbalizer lacks class(es) {', '.join(map(repr, missing))} of the task (its "
                                  f"classes: {', '.join(labels)}): give label words for every class")
            if extra:
                raise PromptError(f"verbalizer names class(es) {', '.join(map(repr, extra))} the task does not have "
                                  f"(its classes: {', '.join(labels)}): fix the spelling or remove them")
            words = [data[label] for label in labels]
        elif isinstance(data, list | tuple):
            if len(data) != len(labels):
                raise PromptError(f"verbalizer lists {len(data)} classes but the task has {len(labels)} "
                                  f"({', '.join(labels)}): give one entry per class, in that order, or a JSON object")
            words = list(data)
        else:
            raise PromptError("a verbalizer is a JSON object (class -> word or list of words) or a list, got "
                              f"{type(data).__name__}")
        as_tuples = tuple(tuple([w] if isinstance(w, str) else w) if isinstance(w, str | list | tuple)
                          else _bad_entry(w) for w in words)
        return cls(labels, as_tuples, class_reduce)

    def flat(self) -> list[tuple[int, str]]:
        """(class index, word) for every word, class by class: the order scores are laid out in."""
        return [(c, w) for c, words in enumerate(self.words) for w in words]

    def to_json(self) -> dict[str, list[str]]:
        return {label: list(words) for label, words in zip(self.labels, self.words)}


def _bad_entry(value: Any) -> tuple[str, ...]:
    raise PromptError(f"verbalizer entry {value!r} is neither a word nor a list of words")


def _load(spec: str | Path) -> Any:
    text = str(spec)
    path = Path(text).expanduser()
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        if not path.is_file():
            raise PromptError(f"verbalizer {text!r} is neither JSON nor an existing file: pass a JSON object such "
                              "as '{\"negative\": \"bad\", \"positive\": \"great\"}' or a .json file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PromptError(f"{path} is not UTF-8 text ({exc.reason}): save the verbalizer as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{exc.lineno}" if path.is_file() else "verbalizer"
        raise PromptError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno}): fix the verbalizer") from None
