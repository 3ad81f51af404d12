"""What loading a checkpoint did, shared by every loader (HF directories, GGUF files, runs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoadReport:
    """What loading a checkpoint did: weights left at their fresh init, and weights it did not use."""

    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"newly initialised (train them): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unused checkpoint weights: {', '.join(self.unexpected)}")
        return "; ".join(parts) or "all weights loaded"
