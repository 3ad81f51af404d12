"""Sliding-window patterns and Longformer's global attention, in memory linear in the sequence length.

* :class:`SlidingWindow` is a :class:`~deltaformer.nn.patterns.Pattern`: window ``w`` on each side (or only
  before, for decoders), a dilation per layer or per head; its fast path is :func:`banded_attention`, its
  dense reference path (:meth:`SlidingWindow.reference`) an explicit band mask over full scores.
* :class:`LongformerSelfAttention` is a :class:`~deltaformer.nn.attention.SelfAttention` with three more
  projections for global tokens (Beltagy et al., 2020): every token attends to the global tokens' keys
  (made by the *local* projections, as Hugging Face does) besides its window, and global tokens attend to
  every token through ``query_global``/``key_global``/``value_global``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .attention import SelfAttention
from .banded import banded_attention, window_to_dense
from .linear import PLAIN_LINEARS, Linear
from .patterns import ExtraKV, Pattern, dense_attention, expand_kv_heads, join_extra


class SlidingWindow(Pattern):
    """Query ``i`` sees keys ``i + o * dilation`` for ``-window <= o <= window`` (``o <= 0`` when causal).

    ``dilation``: one value, or one per head (heads with the same dilation run together). ``block``: queries
    per kernel block (default: the window), a speed/memory knob that never changes results.
    Queries whose own key is masked (padding) output zeros, as in Hugging Face's Longformer.
    """

    def __init__(
        self, window: int, dilation: int | Sequence[int] = 1, causal: bool = False, block: int | None = None
    ) -> None:
        super().__init__()
        dilations = [dilation] if isinstance(dilation, int) else list(dilation)
        if window < 0 or not dilations or min(dilations) < 1:
            raise ConfigError(f"sliding window needs window >= 0 and dilations >= 1, got {window} and {dilation}")
        self.window = window
        self.dilation: int | tuple[int, ...] = dilation if isinstance(dilation, int) else tuple(dilations)
        self.causal = causal
        self.block = block

    def extra_repr(self) -> str:
        return f"window={self.window}, dilation={self.dilation}, causal={self.causal}"

    def head_dilations(self, n_heads: int) -> list[int]:
        if isinstance(self.dilation, int):
            return [self.dilation] * n_heads
        if len(self.dilation) != n_heads:
            raise ConfigError(f"{len(self.dilation)} per-head dilations given for {n_heads} heads: give one per head")
        return list(self.dilation)

    def allowed(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        """(q_len, k_len) band, or (heads, q_len, k_len) with per-head dilations; queries are the last keys."""
        dilations = [self.dilation] if isinstance(self.dilation, int) else list(self.dilation)
        step = torch.tensor(dilations, device=device)[:, None, None]
        rel = torch.arange(k_len, device=device)[None, :] - torch.arange(k_len - q_len, k_len, device=device)[:, None]
        band = (rel % step == 0) & (rel >= -self.window * step) & (rel <= (0 if self.causal else self.window) * step)
        return band[0] if isinstance(self.dilation, int) else band

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_mask: Tensor | None = None,
        extra: ExtraKV | None = None,
        need_weights: bool = False,
        dropout_p: float = 0.0,
        scale: float | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Banded fast path; weights come in window layout (B, H, S, slots + window width).

        Decoding with a cache (fewer queries than keys) takes the dense path: one row per query is linear.
        A window takes no further ``attn_mask`` (a (queries x keys) mask is what it avoids).
        """
        if attn_mask is not None:
            raise InputError("sliding-window attention takes no attn_mask: mask keys with key_mask")
        if q.shape[2] != k.shape[2]:
            return self.reference(q, k, v, key_mask=key_mask, extra=extra, dropout_p=dropout_p, scale=scale)
        n_heads = q.shape[1]
        k, v = expand_kv_heads(k, n_heads), expand_kv_heads(v, n_heads)
        slots: dict[str, Any] = {} if extra is None else dict(
            extra_key=expand_kv_heads(extra.key, n_heads), extra_value=expand_kv_heads(extra.value, n_heads),
            extra_mask=None if extra.mask is None else extra.mask.to(torch.bool),
        )
        options: dict[str, Any] = dict(window=self.window, causal=self.causal, key_mask=key_mask, block=self.block,
                       need_weights=need_weights, dropout_p=dropout_p, scale=scale)
        dilations = self.head_dilations(n_heads)
        if len(set(dilations)) == 1:
            return banded_attention(q, k, v, dilation=dilations[0], **slots, **options)
        outs: list[Tensor] = []
        weights: list[Tensor] = []
        order: list[int] = []
        for d in sorted(set(dilations)):
            heads = [h for h, hd in enumerate(dilations) if hd == d]
            pick = torch.tensor(heads, device=q.device)
            group = {name: t.index_select(1, pick) if name != "extra_mask" else t for name, t in slots.items()}
            out, w = banded_attention(q.index_select(1, pick), k.index_select(1, pick), v.index_select(1, pick),
                                      dilation=d, **group, **options)
            outs.append(out)
            if w is not None:
                weights.append(w)
            order += heads
        inverse = torch.tensor(order, device=q.device).argsort()
        out = torch.cat(outs, dim=1).index_select(1, inverse)
        return out, torch.cat(weights, dim=1).index_select(1, inverse) if need_weights else None

    def reference(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_mask: Tensor | None = None,
        extra: ExtraKV | None = None,
        dropout_p: float = 0.0,
        scale: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Dense path: explicit band mask over full scores; weights (B, H, Sq, slots + Sk). The test oracle."""
        n_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
        slots = 0 if extra is None else extra.key.shape[2]
        query_ok = None if key_mask is None else key_mask[:, k_len - q_len:].to(torch.bool)
        k, v, key_mask = join_extra(k, v, key_mask, extra)
        band = self.allowed(q_len, k_len, q.device)
        band = band if band.dim() == 3 else band[None]
        mask = torch.cat([band.new_ones(band.shape[0], q_len, slots), band], dim=-1)[None]
        if key_mask is not None:
            mask = mask & key_mask.to(torch.bool)[:, None, None, :]
        out, weights = dense_attention(q, expand_kv_heads(k, n_heads), expand_kv_heads(v, n_heads), mask,
                                       dropout_p, scale)
        if query_ok is not None:
            out = torch.where(query_ok[:, None, :, None], out, 0)
            weights = torch.where(query_ok[:, None, :, None], weights, 0)
        return out, weights


def with_global(allowed: Tensor, global_positions: Sequence[int]) -> Tensor:
    """A (.., S, S) allowed-cells mask with Longformer's global rule added (Beltagy et al., 2020, fig. 2):
    a global query sees every key, every query sees the global keys."""
    out = allowed.clone()
    index = torch.tensor(list(global_positions), dtype=torch.long, device=allowed.device)
    out[..., index, :] = True
    out[..., :, index] = True
    return out


def dense_weights(local: Tensor, global_: Tensor | None, global_positions: Sequence[int], window: int,
                  dilation: int | Sequence[int]) -> Tensor:
    """One input's :class:`LongformerSelfAttention` weights unrolled to (H, S, S).

    ``local`` (H, S, G + width): global keys first, then the window offsets (``need_weights``' local part for
    one input); ``global_`` (H, S, G): what each global query gives each key (the global part, transposed).
    Global queries' rows come from ``global_``; their local rows are zeros.
    """
    slots = len(global_positions)
    dense = window_to_dense(local[None], window, dilation, slots=slots)[0]  # (H, S, G + S)
    out = dense[..., slots:].clone()
    index = torch.tensor(list(global_positions), dtype=torch.long, device=local.device)
    if slots and global_ is not None:
        out[..., index] += dense[..., :slots]
        out[:, index, :] = global_.transpose(1, 2)
    return out


@dataclass
class GlobalTokens:
    """Positions with global attention, found once per forward and shared by every layer.

    ``index``: (B, G) positions, G = the most global tokens of any sequence in the batch; a sequence with
    fewer fills its spare slots with distinct non-global positions, marked False in ``valid`` (B, G).
    """

    index: Tensor
    valid: Tensor
    is_global: Tensor

    @classmethod
    def from_mask(cls, global_mask: Tensor | None) -> GlobalTokens | None:
        """From a (B, S) 0/1 mask (1 = global); None when no position is global."""
        if global_mask is None:
            return None
        is_global = global_mask.to(torch.bool)
        count = int(is_global.sum(dim=1).max()) if is_global.numel() else 0  # one host sync per forward
        if count == 0:
            return None
        index = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :count]
        return cls(index=index, valid=is_global.gather(1, index), is_global=is_global)


@dataclass
class LongformerMask:
    """What Longformer attention takes where other attention takes a key mask: padding plus global tokens."""

    key_mask: Tensor | None
    tokens: GlobalTokens | None = None


class LongformerSelfAttention(SelfAttention):
    """Sliding-window self-attention plus global attention with its own projections.

    Call it as a :class:`SelfAttention` with a :class:`LongformerMask` (or a plain key mask: no global
    tokens). With ``need_weights`` it returns ``(local, global)``: local weights in window layout
    (B, H, S, G + window width), global tokens first as in Hugging Face, and global weights (B, H, G, S).
    """

    def __init__(
        self, dim: int, n_heads: int, *, window: int, dilation: int | Sequence[int] = 1, causal: bool = False,
        dropout: float = 0.0, block: int | None = None, bias: bool = True,
    ) -> None:
        super().__init__(dim, n_heads, bias=bias, dropout=dropout,
                         pattern=SlidingWindow(window, dilation, causal, block))
        self.query_global = Linear(dim, n_heads * self.head_dim, bias=bias)
        self.key_global = Linear(dim, n_heads * self.head_dim, bias=bias)
        self.value_global = Linear(dim, n_heads * self.head_dim, bias=bias)

    def forward(  # type: ignore[override]  # also takes a LongformerMask, and returns global weights too
        self, x: Tensor, key_mask: Tensor | LongformerMask | None = None, *, need_weights: bool = False
    ) -> tuple[Tensor, tuple[Tensor | None, Tensor | None] | None]:
        mask = key_mask if isinstance(key_mask, LongformerMask) else LongformerMask(key_mask)
        padding, tokens = mask.key_mask, mask.tokens
        q, k, v = (self.split_heads(proj(x), self.n_heads) for proj in (self.query, self.key, self.value))
        prefix: ExtraKV | None = self.prefix(x.shape[0]) if self.prefix is not None else None
        dropout = self.dropout if self.training else 0.0
        local_mask, extra = padding, prefix
        if tokens is not None:  # global keys join every window; global tokens leave it (no double count)
            local_mask = ~tokens.is_global if padding is None else padding & ~tokens.is_global
            extra = _join_slots(prefix, ExtraKV(_gather_positions(k, tokens.index), _gather_positions(v, tokens.index),
                                                tokens.valid))
        out, local_weights = self.pattern.attend(q, k, v, key_mask=local_mask, extra=extra,
                                                 need_weights=need_weights, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        global_weights = None
        if tokens is not None:
            rows, global_weights = self._global_rows(x, tokens, padding, prefix, dropout)
            batch_index = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(tokens.index)
            where = (batch_index[tokens.valid], tokens.index[tokens.valid])
            put = out.index_put if torch.is_grad_enabled() else out.index_put_  # in place: one copy less
            out = put(where, rows[tokens.valid])
        return self.out(out), ((local_weights, global_weights) if need_weights else None)

    def _global_rows(
        self, x: Tensor, tokens: GlobalTokens, padding: Tensor | None, prefix: ExtraKV | None, dropout_p: float
    ) -> tuple[Tensor, Tensor]:
        """Global tokens attend to every (unpadded) position: (B, G, H * D) rows and (B, H, G, slots + S) weights."""
        states = x.gather(1, tokens.index[..., None].expand(-1, -1, x.shape[-1]))
        q = self.split_heads(self.query_global(states), self.n_heads)
        if prefix is None and dropout_p == 0 and self._foldable(q.shape[2]):
            out, weights = folded_attention(q, x, self.key_global, self.value_global, padding)
        else:
            k = self.split_heads(self.key_global(x), self.n_heads)
            v = self.split_heads(self.value_global(x), self.n_heads)
            k, v, key_mask = join_extra(k, v, padding, prefix)
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out, weights = dense_attention(q, k, v, mask, dropout_p)
        weights = weights * tokens.valid[:, None, :, None]
        return out.transpose(1, 2).reshape(x.shape[0], q.shape[2], -1), weights

    def _foldable(self, count: int) -> bool:
        """Fold the global key/value projections into the queries when that is cheaper (see folded_attention);
        only for plain linears, so a delta wrapping them (LoRA) is never bypassed. (Callers also need no
        extra slots and no dropout, which folding cannot express.)"""
        plain = all(type(p) in PLAIN_LINEARS and p.bias is not None for p in (self.key_global, self.value_global))
        return plain and count * self.n_heads < self.key_global.in_features


def folded_attention(
    q: Tensor, x: Tensor, key: nn.Linear, value: nn.Linear, key_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Attention of (B, H, G, D) queries over keys ``key(x)`` and values ``value(x)`` without computing them.

    ``q . (W_k x_j + b_k) = (q W_k) . x_j + q . b_k`` and ``sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v``
    (the weights sum to 1: no dropout). Folding costs about 4 * S * C * H * G multiply-adds against
    2 * S * C * C for projecting every position's key and value (hidden size C), so it wins while G * H < C:
    the usual few global tokens. ``key_mask``: (B, S) bool. Returns (B, H, G, D) and weights (B, H, G, S).
    """
    batch, heads, count, dim = q.shape
    hidden = x.shape[-1]
    folded = torch.einsum("bhgd,hdc->bhgc", q, key.weight.view(heads, dim, hidden)).reshape(batch, -1, hidden)
    shift = (q * key.bias.view(heads, 1, dim)).sum(-1).reshape(batch, -1, 1)  # q . b_k, the same for every key
    scores = torch.baddbmm(shift, folded, x.transpose(1, 2)) * dim**-0.5  # (B, H * G, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    context = torch.bmm(weights, x).view(batch, heads, count, hidden)
    out = torch.einsum("bhgc,hdc->bhgd", context, value.weight.view(heads, dim, hidden))
    return out + value.bias.view(heads, 1, dim), weights.view(batch, heads, count, -1)


def _gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """(B, H, S, D) at (B, G) positions -> (B, H, G, D)."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _all_valid(extra: ExtraKV) -> Tensor:
    """The slots' mask, all True when they have none."""
    if extra.mask is not None:
        return extra.mask
    return torch.ones(extra.key.shape[0], extra.key.shape[2], dtype=torch.bool, device=extra.key.device)


def _join_slots(first: ExtraKV | None, second: ExtraKV) -> ExtraKV:
    """Concatenate two sets of extra slots (prefix tuning's, then the global tokens')."""
    if first is None:
        return second
    first_mask = _all_valid(first)
    return ExtraKV(
        key=torch.cat([first.key.to(second.key.dtype), second.key], dim=2),
        value=torch.cat([first.value.to(second.value.dtype), second.value], dim=2),
        mask=torch.cat([first_mask.to(torch.bool), _all_valid(second).to(torch.bool)], dim=1),
    )
