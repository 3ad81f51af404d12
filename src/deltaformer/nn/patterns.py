"""Attention patterns: *how* queries meet keys, separate from the projections that make them.

An attention module projects hidden states to queries, keys and values and hands them to a pattern.
Each pattern has two paths that tests hold equal:

* a dense reference path (``need_weights=True``): explicit scores, returns the attention weights;
* a fast path: ``scaled_dot_product_attention`` here, banded linear-memory kernels for sliding patterns
  (with attention dropout on CPU, explicit scores again: SDPA's CPU dropout mask costs more than the rest).

Extra key/value slots (prefix tuning, P-tuning v2) arrive as :class:`ExtraKV`; every query may see them,
whatever the pattern, which is what makes prefix tuning work on any architecture for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import drop_mask, packable


@dataclass
class ExtraKV:
    """Key/value slots every query may attend to, placed before the sequence's own keys.

    ``key``/``value``: (batch, kv_heads, slots, head_dim). ``mask``: (batch, slots) bool, True = visible;
    None means all visible. Used by prefix tuning and P-tuning v2.
    """

    key: Tensor
    value: Tensor
    mask: Tensor | None = None


def expand_kv_heads(x: Tensor, n_heads: int) -> Tensor:
    """Repeat grouped key/value heads so each query head has its own (grouped-query attention)."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def join_extra(k: Tensor, v: Tensor, key_mask: Tensor | None, extra: ExtraKV | None):
    """Prepend extra slots to keys, values and the key mask."""
    if extra is None:
        return k, v, key_mask
    k = torch.cat([extra.key.to(k.dtype), k], dim=2)
    v = torch.cat([extra.value.to(v.dtype), v], dim=2)
    if key_mask is None and extra.mask is None:
        return k, v, None
    batch, slots, seq = k.shape[0], extra.key.shape[2], k.shape[2] - extra.key.shape[2]
    own = key_mask if key_mask is not None else torch.ones(batch, seq, dtype=torch.bool, device=k.device)
    pre = extra.mask if extra.mask is not None else torch.ones(batch, slots, dtype=torch.bool, device=k.device)
    return k, v, torch.cat([pre.to(torch.bool), own], dim=1)


class Pattern(nn.Module):
    """Base of attention patterns. Subclasses override :meth:`allowed` (and may add a fast kernel)."""

    causal: bool = False

    def allowed(self, q_len: int, k_len: int, device: torch.device) -> Tensor | None:
        """(q_len, k_len) bool matrix of pairs the pattern allows, or None for all pairs.

        Queries are the *last* ``q_len`` positions of the ``k_len`` keys (so a KV cache lines up).
        """
        return None

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
        """Attend queries (B, H, Sq, D) to keys/values (B, Hkv, Sk, D); returns (B, H, Sq, D) and weights.

        ``key_mask``: (B, Sk) bool, True = real token. Weights are (B, H, Sq, slots + Sk) when asked for.
        ``attn_mask``: a further mask on top of the pattern, bool (True = visible) or float (added to the
        scores), broadcastable to (B, H, Sq, slots + Sk): ``torch.nn.MultiheadAttention``'s masks, converted.
        """
        n_heads = q.shape[1]
        slots = extra.key.shape[2] if extra is not None else 0
        k, v, key_mask = join_extra(k, v, key_mask, extra)
        mask = combine_masks(self._mask(q.shape[2], k.shape[2], slots, key_mask, q.device), attn_mask)
        if need_weights or explicit_dropout(q, dropout_p):
            out, weights = dense_attention(q, expand_kv_heads(k, n_heads), expand_kv_heads(v, n_heads), mask,
                                           dropout_p, scale)
            return out, weights if need_weights else None
        causal_fast = self.causal and mask is None and slots == 0 and q.shape[2] == k.shape[2]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal_fast else mask, dropout_p=dropout_p, is_causal=causal_fast,
            scale=scale, enable_gqa=k.shape[1] != n_heads,
        )
        return out, None

    def _mask(self, q_len: int, k_len: int, slots: int, key_mask: Tensor | None, device: torch.device):
        """Combine the pattern with padding into a (B|1, 1, Sq, Sk) bool mask, or None when all is allowed."""
        allowed = self.allowed(q_len, k_len - slots, device)
        if allowed is not None and slots:
            allowed = torch.cat([allowed.new_ones(q_len, slots), allowed], dim=1)
        if key_mask is None:
            return None if allowed is None else allowed[None, None]
        padded = key_mask[:, None, None, :]
        return padded if allowed is None else padded & allowed[None, None]


def combine_masks(mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """Both masks at once: bool (True = visible) if both are bool, else float (disallowed pairs at -inf)."""
    if attn_mask is None or mask is None:
        return mask if attn_mask is None else attn_mask
    if mask.dtype == torch.bool and attn_mask.dtype == torch.bool:
        return mask & attn_mask
    dtype = attn_mask.dtype if attn_mask.is_floating_point() else mask.dtype
    as_float = [m if m.is_floating_point() else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(
        ~m, float("-inf")) for m in (mask, attn_mask)]
    return as_float[0] + as_float[1]


class Full(Pattern):
    """Every query sees every (unpadded) key: BERT, encoder self-attention, cross-attention."""


class Causal(Pattern):
    """Each query sees itself and earlier keys: decoder self-attention."""

    causal = True

    def allowed(self, q_len: int, k_len: int, device: torch.device) -> Tensor:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return torch.arange(k_len, device=device)[None, :] <= q_pos

    def _mask(self, q_len: int, k_len: int, slots: int, key_mask: Tensor | None, device: torch.device):
        """As the base, but a query that may see no key at all (a left-padding position, which sees only
        earlier padding) sees every key instead: its output is never read, and a fully masked row would
        otherwise leave the fast kernels to return zeros on one device and NaN on another. A single query (a
        decoding step) is the newest position and sees every key: only padding masks it, or nothing."""
        if q_len == 1:
            mask = None if key_mask is None else key_mask[:, None, None, :]
        else:
            mask = super()._mask(q_len, k_len, slots, key_mask, device)
        if key_mask is None or mask is None:
            return mask
        return mask | ~mask.any(-1, keepdim=True)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Attention with explicit weights: the oracle every fast path is tested against, and the CPU path for
    attention dropout (SDPA's CPU kernels draw their dropout mask slowly; see :mod:`deltaformer.nn.dropout`).

    ``mask``: bool (True = visible) or additive, broadcastable to the scores. Returns the output and the
    weights before dropout.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores.add_(mask)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0 and packable(weights, dropout_p):  # the mask alone; its scale goes on the smaller output
        drop, keep_scale = drop_mask(weights.shape, dropout_p)
        return torch.matmul(weights.masked_fill(drop, 0), v).mul_(keep_scale), weights
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(dropped, v), weights


def explicit_dropout(q: Tensor, dropout_p: float) -> bool:
    """Whether attention with dropout should take :func:`dense_attention` rather than SDPA: on CPU."""
    return dropout_p > 0 and q.device.type == "cpu"
