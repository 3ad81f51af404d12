"""Multi-head attention = projections + a pattern.

The module owns the query/key/value/output projections (plain linears, :class:`~deltaformer.nn.linear.Linear`, so delta methods can wrap
them by name) and delegates *how* queries meet keys to a :class:`~deltaformer.nn.patterns.Pattern`.
Extra key/value slots come from an optional ``prefix`` provider (prefix tuning, P-tuning v2), so every
pattern sees them without knowing where they come from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .kv_cache import CacheLayer
from .linear import PLAIN_LINEARS, Linear, linear
from .patterns import ExtraKV, Full, Pattern

#: Below this many input positions the Q/K/V projections run one by one (see ``SelfAttention.project_qkv``).
FUSE_MIN_ROWS = 64


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
        self.query = Linear(dim, n_heads * self.head_dim, bias=bias)
        self.key = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.value = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.out = Linear(n_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.dropout = dropout
        self.pattern = pattern or Full()
        self.prefix: nn.Module | None = None
        #: Score scale; None is 1/sqrt(head_dim) (GPT-2 configs may turn scaling off or divide by the layer).
        self.scale: float | None = None

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
        cache: CacheLayer | None = None,
        queries: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x``: (B, S, dim); ``key_mask``: (B, S_total) bool, True = real token. Returns output and weights.

        ``queries``: (B, Sq, dim) inputs of the positions whose outputs are wanted (default ``x``); keys and
        values still come from all of ``x``, so a caller needing a few positions projects only those.
        ``attn_mask``: a further mask the pattern applies (see :meth:`~deltaformer.nn.patterns.Pattern.attend`).
        """
        if queries is None:
            q, k, v = self.project_qkv(x)
        else:
            q, k, v = self.query(queries), self.key(x), self.value(x)
        q = self.split_heads(q, self.n_heads)
        k = self.split_heads(k, self.n_kv_heads)
        v = self.split_heads(v, self.n_kv_heads)
        if rotary is not None:
            q, k = rotary(q, k)
        if cache is not None:
            k, v = cache.update(k, v)
        extra: ExtraKV | None = self.prefix(x.shape[0]) if self.prefix is not None else None
        out, weights = self.pattern.attend(
            q, k, v, key_mask=key_mask, extra=extra, need_weights=need_weights,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale, attn_mask=attn_mask,
        )
        batch, _, seq, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1)), weights


    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value projections of ``x``, their base products as one GEMM when possible.

        Plain projections, or wrapped ones whose deltas only act on outputs (LoRA, BitFit, output-side
        IA3; they offer ``output_side``), run on concatenated weights: ``x`` is read once and backward
        computes one input gradient instead of three that must then be summed. Anything else (an input-side
        delta, a mix of biased and unbiased projections) runs the three layers one by one, and so do inputs of
        fewer than ``FUSE_MIN_ROWS`` positions (a decoding step): concatenating the weights would then copy
        more memory than the three products read.
        """
        layers = (self.query, self.key, self.value)
        if x.numel() < FUSE_MIN_ROWS * x.shape[-1]:
            return self.query(x), self.key(x), self.value(x)
        finishes = [_output_side(layer, x) for layer in layers]
        biases = [layer.bias for layer in layers]
        if any(f is None for f in finishes) or len({b is None for b in biases}) > 1:
            return self.query(x), self.key(x), self.value(x)
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]  # all or none are None (checked above)
        fused = linear(x, weight, bias).split([layer.weight.shape[0] for layer in layers], dim=-1)
        return tuple(f(y) for f, y in zip(finishes, fused))  # type: ignore[misc, return-value]  # no finish is None here (checked above); three projections


def _output_side(layer: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor] | None:
    """Identity for a plain linear, the wrapper's output-side function for a wrapped one, else None."""
    if type(layer) in PLAIN_LINEARS:
        return _identity
    output_side = getattr(layer, "output_side", None)
    return output_side(x) if callable(output_side) else None


def _identity(y: Tensor) -> Tensor:
    return y


class KVCache:
    """Keys and values of earlier positions, grown by concatenation (LED's search); decoder LMs use the
    preallocated :class:`deltaformer.nn.kv_cache.KVCache`."""

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.key is not None and self.value is not None:
            k = torch.cat([self.key, k], dim=2)
            v = torch.cat([self.value, v], dim=2)
        self.key, self.value = k, v
        return k, v


class CrossAttention(nn.Module):
    """Decoder queries over the encoder's output (the memory), whose keys and values are made once per input.

    Not a :class:`SelfAttention`: its forward takes the encoder's keys and values, which no self-attention call
    does. It has the same projections under the same names (``query``, ``key``, ``value``, ``out``: plain linears
    that deltas wrap by name) and full attention over the memory. The LED and the original Transformer use it.
    """

    def __init__(self, dim: int, n_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query, self.key, self.value, self.out = (Linear(dim, dim) for _ in range(4))
        self.dropout = dropout
        self.pattern = Full()

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, S, dim) -> (B, heads, S, head_dim)."""
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def memory(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the encoder's output (B, S, dim): reused at every decoding step."""
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def forward(self, x: Tensor, memory: tuple[Tensor, Tensor], key_mask: Tensor | None,
                attn_mask: Tensor | None = None, *, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``key_mask`` marks the memory's real positions; ``attn_mask`` (torch's conventions) is added on top."""
        out, weights = self.pattern.attend(self.split_heads(self.query(x)), *memory, key_mask=key_mask,
                                           attn_mask=attn_mask, need_weights=need_weights,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), weights
