"""Bidirectional maps between Hugging Face parameter names and ours.

A rule is a pair of templates such as ``("encoder.layer.{i}.attention.self.query", "layers.{i}.attn.query")``;
``{name}`` placeholders match one dotted component. The same rules translate state dicts in both
directions and translate peft adapter keys, which name HF module paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    regex = "".join(f"(?P<{p[1:-1]}>[^.]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex + r"(?P<_rest>(\..*)?)$")


class NameMap:
    """Translate module/parameter paths between HF's layout and ours by prefix rules (first match wins)."""

    def __init__(self, rules: Iterable[tuple[str, str]]) -> None:
        self.rules = list(rules)
        self._to_ours = [(_compile(hf), ours) for hf, ours in self.rules]
        self._to_hf = [(_compile(ours), hf) for hf, ours in self.rules]

    @staticmethod
    def _apply(name: str, table) -> str | None:
        for regex, template in table:
            m = regex.match(name)
            if m:
                groups = m.groupdict()
                return template.format(**groups) + groups["_rest"]
        return None

    def to_ours(self, name: str) -> str | None:
        """Our name for an HF name, or None when no rule matches."""
        return self._apply(name, self._to_ours)

    def to_hf(self, name: str) -> str | None:
        """The HF name for one of ours, or None when no rule matches."""
        return self._apply(name, self._to_hf)

    def prefixed(self, hf_prefix: str, ours_prefix: str) -> NameMap:
        """The same rules under a prefix on both sides (a backbone inside a task model)."""
        return NameMap((f"{hf_prefix}{hf}", f"{ours_prefix}{ours}") for hf, ours in self.rules)

    def __add__(self, other: NameMap) -> NameMap:
        return NameMap(self.rules + other.rules)


def normalize_legacy(name: str) -> str:
    """Old TF-ported checkpoints name LayerNorm parameters ``gamma``/``beta``."""
    if name.endswith(".gamma"):
        return name[: -len(".gamma")] + ".weight"
    if name.endswith(".beta"):
        return name[: -len(".beta")] + ".bias"
    return name
