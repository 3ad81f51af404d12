"""Multi-head attention = projections + a pattern.

The module owns the query/key/value/output projections (plain ``nn.Linear`` so delta methods can wrap
them by name) and delegates *how* queries meet keys to a :class:`~deltaformer.nn.patterns.Pattern`.
Extra key/value slots come from an optional ``prefix`` provider (prefix tuning, P-tuning v2), so every
pattern sees them without knowing where they come from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .patterns import ExtraKV, Full, Pattern


class SelfAttention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention.

    ``prefix``: a module called as ``prefix(batch_size)`` that returns :class:`ExtraKV` slots, or None.
    ``rotary``: a callable ``(q, k, positions) -> (q, k)`` applied after projection (RoPE), or None.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = True,
        out_bias: bool | None = None,
        dropout: float = 0.0,
        pattern: Pattern | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        self.query = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.key = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.value = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.dropout = dropout
        self.pattern = pattern or Full()
        self.prefix: nn.Module | None = None

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        """(B, S, n_heads * D) -> (B, n_heads, S, D)."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
        rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x``: (B, S, dim); ``key_mask``: (B, S_total) bool, True = real token. Returns output and weights."""
        q = self.split_heads(self.query(x), self.n_heads)
        k = self.split_heads(self.key(x), self.n_kv_heads)
        v = self.split_heads(self.value(x), self.n_kv_heads)
        if rotary is not None:
            q, k = rotary(q, k)
        if cache is not None:
            k, v = cache.update(k, v)
        extra: ExtraKV | None = self.prefix(x.shape[0]) if self.prefix is not None else None
        out, weights = self.pattern.attend(
            q, k, v, key_mask=key_mask, extra=extra, need_weights=need_weights,
            dropout_p=self.dropout if self.training else 0.0,
        )
        batch, _, seq, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1)), weights


class KVCache:
    """Keys and values of earlier positions for incremental decoding, one per attention layer."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is not None:
            k = torch.cat([self.key, k], dim=2)
            v = torch.cat([self.value, v], dim=2)
        self.key, self.value = k, v
        return k, v
