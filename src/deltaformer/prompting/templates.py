"""Prompt templates: text with slots, parsed once into pieces that the renderer tokenizes one by one.

Slots: ``{text}`` and ``{text_b}`` (the example's texts), ``{mask}`` (where the answer goes) and ``{soft}`` /
``{soft:N}`` (one or N trainable soft tokens, a P-tuning delta with placeholder positions). ``{{`` and ``}}``
are literal braces. For a masked LM the template is a cloze: ``{mask}`` is required and becomes as many
mask tokens as the label word has. For a causal LM the answer continues the prompt, so ``{mask}`` must come
last (or be left out: the answer is appended); text after it could never influence the answer's
probability and is refused rather than silently dropped.

Pieces are tokenized separately (as PET and OpenPrompt do) so that truncation only ever cuts the example's
own text, never the template, the mask or the soft tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PromptError

#: What a template may be rendered for: a masked LM (cloze) or a causal LM (the answer continues the prompt).
KINDS = ("mlm", "causal")
TEXT_SLOTS = ("text", "text_b")
_SLOT = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SOFT = re.compile(r"^soft(?::(\d+))?$")


@dataclass(frozen=True)
class Piece:
    """One part of a template: ``literal`` text, a text slot (``text`` / ``text_b``), ``mask``, or ``soft``
    (``count`` soft tokens)."""

    kind: str
    value: str = ""
    count: int = 0


@dataclass(frozen=True)
class Template:
    """A parsed template; ``source`` is the text it was parsed from (saved with runs)."""

    source: str
    pieces: tuple[Piece, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        if not isinstance(source, str) or not source.strip():
            raise PromptError("the template is empty: write one such as '{text} It was {mask}.'")
        pieces: list[Piece] = []
        literal: list[str] = []
        pos = 0
        for m in _SLOT.finditer(source):
            literal.append(source[pos:m.start()])
            pos = m.end()
            token = m.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
                continue
            if m.group(1) is None:
                raise PromptError(f"template {source!r} has an unmatched {token!r} at character {m.start()}: "
                                  "write {{ or }} for a literal brace")
            if literal:
                pieces.append(Piece("literal", "".join(literal)))
                literal = []
            pieces.append(_slot(m.group(1).strip(), source))
        literal.append(source[pos:])
        if "".join(literal):
            pieces.append(Piece("literal", "".join(literal)))
        pieces = [p for p in pieces if p.kind != "literal" or p.value]
        template = cls(source, tuple(_merge_literals(pieces)))
        template._check_structure()
        return template

    def _check_structure(self) -> None:
        kinds = [p.kind for p in self.pieces]
        if "text" not in kinds:
            raise PromptError(f"template {self.source!r} has no {{text}} slot: every prompt must show the example")
        for name in ("text", "text_b", "mask"):
            if kinds.count(name) > 1:
                raise PromptError(f"template {self.source!r} has {{{name}}} {kinds.count(name)} times: use it once")

    @property
    def has_mask(self) -> bool:
        return any(p.kind == "mask" for p in self.pieces)

    @property
    def uses_text_b(self) -> bool:
        return any(p.kind == "text_b" for p in self.pieces)

    @property
    def soft_tokens(self) -> int:
        """How many soft tokens the template holds (the P-tuning delta's ``num_virtual_tokens``)."""
        return sum(p.count for p in self.pieces if p.kind == "soft")

    def check_for(self, kind: str) -> None:
        """Refuse a template the model kind cannot use (an MLM needs ``{mask}``; a causal LM's answer is last)."""
        if kind not in KINDS:
            raise PromptError(f"unknown model kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "mlm" and not self.has_mask:
            raise PromptError(f"template {self.source!r} has no {{mask}}: a masked LM predicts the label word at "
                              "the mask, so add {mask} where the answer goes, e.g. '{text} It was {mask}.'")
        if kind == "causal" and self.has_mask:
            after = self.pieces[[p.kind for p in self.pieces].index("mask") + 1:]
            if any(p.kind != "literal" or p.value.strip() for p in after):
                raise PromptError(f"template {self.source!r} has text after {{mask}}: a causal LM's answer "
                                  "continues the prompt, so end the template with {mask} (or leave it out)")

    def prompt_pieces(self, kind: str) -> tuple[Piece, ...]:
        """The pieces a model reads; for a causal LM, those before the answer (``{mask}`` and after dropped)."""
        self.check_for(kind)
        if kind == "mlm" or not self.has_mask:
            return self.pieces
        return self.pieces[:[p.kind for p in self.pieces].index("mask")]


def _slot(name: str, source: str) -> Piece:
    if name in TEXT_SLOTS:
        return Piece(name)
    if name == "mask":
        return Piece("mask")
    soft = _SOFT.match(name)
    if soft:
        count = int(soft.group(1)) if soft.group(1) else 1
        if count < 1:
            raise PromptError(f"template {source!r}: {{soft:{count}}} needs at least one soft token")
        return Piece("soft", count=count)
    raise PromptError(f"template {source!r} has an unknown slot {{{name}}}: slots are {{text}}, {{text_b}}, "
                      "{mask}, {soft} and {soft:N}")


def _merge_literals(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and p.kind == "literal" and out[-1].kind == "literal":
            out[-1] = Piece("literal", out[-1].value + p.value)
        else:
            out.append(p)
    return out
