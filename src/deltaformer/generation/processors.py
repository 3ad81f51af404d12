"""Next-token score processors: repetition penalty, temperature, top-k, top-p, min-p.

Each works on a whole batch of fp32 scores (B, V) with per-row settings, so one call serves a batch whose rows
came from different requests (continuous batching) and a plain batch alike. The arithmetic is
``transformers``' own (same sort, same comparisons, same order: penalty, temperature, top-k, top-p, min-p),
so equal settings filter equal tokens. A row whose setting is off passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import GenerationConfig

NEG_INF = float("-inf")


@dataclass
class RowSettings:
    """Per-row processor settings as (B,) tensors; ``None`` fields are off for every row."""

    sampling: Tensor  # bool: row draws at random (else argmax)
    penalty: Tensor | None = None  # float: repetition penalty (1 = off)
    temperature: Tensor | None = None  # float (1 = off)
    top_k: Tensor | None = None  # long (0 = off)
    top_p: Tensor | None = None  # float (1 = off)
    min_p: Tensor | None = None  # float (0 = off)

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig], device: torch.device) -> RowSettings:
        """Tensors for ``configs`` (one per row); a filter no row uses stays None, so it costs nothing."""
        sampling = [c.sampling for c in configs]

        def column(values: list, off, dtype) -> Tensor | None:
            return None if all(v == off for v in values) else torch.tensor(values, dtype=dtype, device=device)

        warp = [(c.temperature, c.top_k, c.top_p, c.min_p or 0.0) if s else (1.0, 0, 1.0, 0.0)
                for c, s in zip(configs, sampling)]
        return cls(
            sampling=torch.tensor(sampling, dtype=torch.bool, device=device),
            penalty=column([c.repetition_penalty for c in configs], 1.0, torch.float32),
            temperature=column([w[0] for w in warp], 1.0, torch.float32),
            top_k=column([w[1] for w in warp], 0, torch.long),
            top_p=column([w[2] for w in warp], 1.0, torch.float32),
            min_p=column([w[3] for w in warp], 0.0, torch.float32),
        )

    def select(self, rows: Tensor) -> RowSettings:
        """The settings of ``rows`` (kept rows, in their new order)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows.to(t.device))
        return RowSettings(self.sampling.index_select(0, rows.to(self.sampling.device)), pick(self.penalty),
                           pick(self.temperature), pick(self.top_k), pick(self.top_p), pick(self.min_p))

    @staticmethod
    def cat(parts: Sequence[RowSettings], sizes: Sequence[int]) -> RowSettings:
        """Rows of several settings one after another (``sizes[i]`` rows from ``parts[i]``)."""
        def joined(name: str, off, dtype) -> Tensor | None:
            columns = [getattr(p, name) for p in parts]
            if all(c is None for c in columns):
                return None
            device = parts[0].sampling.device
            return torch.cat([c if c is not None else torch.full((n,), off, dtype=dtype, device=device)
                              for c, n in zip(columns, sizes)])
        return RowSettings(torch.cat([p.sampling for p in parts]), joined("penalty", 1.0, torch.float32),
                           joined("temperature", 1.0, torch.float32), joined("top_k", 0, torch.long),
                           joined("top_p", 1.0, torch.float32), joined("min_p", 0.0, torch.float32))


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Scores of tokens in ``seen`` (B, V bool) divided by the row's penalty, multiplied where negative."""
    penalty = penalty[:, None].to(scores.dtype)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: Tensor, k: Tensor, min_keep: int = 1) -> Tensor:
    """Keep each row's ``k`` best scores (ties with the k-th kept, as HF); k = 0 keeps all."""
    vocab = scores.shape[-1]
    k = torch.where(k > 0, k.clamp(min=min_keep), vocab).clamp(max=vocab)
    largest = int(k.max())
    kth = torch.topk(scores, largest)[0].gather(-1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores: Tensor, p: Tensor, min_keep: int = 1) -> Tensor:
    """Keep the smallest set of best tokens whose probability reaches ``p`` (HF's cumulative test)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p[:, None])
    remove[..., -min_keep:] = False
    remove = remove.scatter(1, order, remove)
    return scores.masked_fill(remove, NEG_INF)


def min_p_filter(scores: Tensor, min_p: Tensor, min_keep: int = 1) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's most likely token's."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    best = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, best, False)
    return scores.masked_fill(remove, NEG_INF)


def process(scores: Tensor, settings: RowSettings, seen: Tensor | None, min_keep: int = 1) -> Tensor:
    """All processors in HF's order; rows that do not sample get only the repetition penalty."""
    if settings.penalty is not None and seen is not None:
        scores = repetition_penalty(scores, seen, settings.penalty)
    if settings.temperature is not None:
        scores = scores / settings.temperature[:, None]
    if settings.top_k is not None:
        scores = top_k_filter(scores, settings.top_k, min_keep)
    if settings.top_p is not None:
        scores = top_p_filter(scores, settings.top_p, min_keep)
    if settings.min_p is not None:
        scores = min_p_filter(scores, settings.min_p, min_keep)
    return scores


def choose(scores: Tensor, settings: RowSettings, generators: Sequence[torch.Generator | None]) -> Tensor:
    """The next token of each row: argmax, or a draw from softmax(scores) with the row's own generator.

    Each sampling row draws with ``torch.multinomial`` from its own generator, so a row's draws depend only
    on its seed and its own scores, never on the rows beside it (batched equals alone).
    """
    chosen = scores.argmax(dim=-1)
    if not bool(settings.sampling.any()):
        return chosen
    probs = torch.softmax(scores, dim=-1)
    for row in torch.nonzero(settings.sampling).flatten().tolist():
        chosen[row] = torch.multinomial(probs[row:row + 1], 1, generator=generators[row])[0, 0]
    return chosen


def seen_tokens(ids: Tensor, mask: Tensor | None, vocab: int) -> Tensor:
    """(B, V) bool: which tokens each row's real (unmasked) ids contain, for the repetition penalty."""
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    ids = ids.clamp(min=0, max=vocab)
    if mask is not None:
        ids = ids.masked_fill(mask[:, -ids.shape[1]:] == 0, vocab)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def mark_seen(seen: Tensor, tokens: Tensor) -> None:
    """Add each row's new token (B,) to ``seen`` in place."""
    seen.scatter_(1, tokens[:, None].clamp(max=seen.shape[1] - 1), True)
