"""Banded (sliding-window) attention whose memory grows linearly with the sequence length.

Query ``i`` sees keys ``j = i + o * dilation`` for ``-window <= o <= window`` (``o <= 0`` when causal), plus a
few extra key slots every query sees (global tokens' keys, prefix-tuning slots).

How: each (sub)sequence is cut into blocks of ``c`` queries; block ``i`` attends to the key blocks
``i - r .. i + r`` (``r * c >= window``) plus the extra slots, all blocks in one batched
``scaled_dot_product_attention`` call with a (c, (2r + 1) * (slots + c)) mask. The keys are laid out once as
blocks of ``slots + c`` rows (the extra slots, then ``c`` positions), so every block's keys are a window of
that buffer: an overlapping strided *view*, not a copy (SDPA reads strides, and ``unfold``'s backward adds the
overlaps up). Only block ``i``'s copy of the extra slots is unmasked. No (seq x seq) tensor exists, in forward
or backward, and the key/value buffers cost one copy of the keys and values whatever the window.

A dilation ``d`` reads the sequence as ``d`` interleaved subsequences (positions with the same residue mod
``d``: strided views again) and runs the undilated kernel on each, so a dilated window costs what an
undilated one of the same size costs. Sequences of any length are padded internally and unpadded at the end.
Queries and outputs stay token-major (B, S, H, D), the layout projections produce and consume.

Weights, when asked for, come in Hugging Face Longformer's window layout: (B, H, S, slots + 2w + 1), the
extra slots first, then offsets ``-w .. w``; :func:`window_to_dense` turns them into (B, H, S, slots + S).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .patterns import dense_attention, explicit_dropout

#: Fewest queries per block by default: smaller blocks waste fewer keys but cost more per-block overhead.
MIN_BLOCK = 32
#: Queries per block without gradients, or with explicit scores (weights asked for, dropout on CPU): a block
#: computes ``c + 2w`` keys for ``2w + 1`` used, so small blocks waste less; with gradients the CPU flash
#: backward runs faster on long blocks, so its blocks match the window.
SMALL_BLOCK = 64


@dataclass(frozen=True)
class BlockLayout:
    """How a (sub)sequence of ``length`` positions is cut: ``blocks`` blocks of ``size`` queries, each seeing
    ``before`` key blocks before it and ``after`` after it (``slots`` extra rows lead every key block)."""

    size: int
    blocks: int
    before: int
    after: int
    slots: int
    reach: int  # the window, clipped to the (sub)sequence: farther offsets hold no key

    @classmethod
    def choose(
        cls, window: int, causal: bool, length: int, slots: int, block: int | None, explicit: bool = False
    ) -> BlockLayout:
        reach = min(window, length - 1)
        smallest = min(block or MIN_BLOCK, length)
        default = SMALL_BLOCK if explicit or not torch.is_grad_enabled() else reach
        target = min(block or max(default, MIN_BLOCK), length)
        before = -(-reach // target) if reach else 0
        size = max(-(-reach // before) if before else target, smallest)
        return cls(size, -(-length // size), before, 0 if causal else before, slots, reach)

    @property
    def width(self) -> int:
        """Rows per key block: the extra slots, then the block's positions."""
        return self.slots + self.size

    @property
    def keys(self) -> int:
        """Keys each query block sees (some masked)."""
        return (self.before + 1 + self.after) * self.width

    def band(self, device: torch.device) -> Tensor:
        """(size, keys) bool: what query ``a`` of a block may see among its keys (padding aside)."""
        column = torch.arange(self.keys, device=device)
        block, row = column // self.width, column % self.width
        is_slot = row < self.slots
        rel = (block - self.before) * self.size + (row - self.slots) - torch.arange(self.size, device=device)[:, None]
        local = ~is_slot & (rel >= -self.reach) & (rel <= (self.reach if self.after else 0))
        return local | (is_slot & (block == self.before))

    def own_key(self, device: torch.device) -> Tensor:
        """(size, keys) bool: each query's own key."""
        column = self.before * self.width + self.slots + torch.arange(self.size, device=device)
        return torch.arange(self.keys, device=device)[None, :] == column[:, None]

    def window_columns(self, offsets: Tensor) -> Tensor:
        """(size, slots + len(offsets)): the key column of each extra slot and window offset, per query."""
        device = offsets.device
        target = torch.arange(self.size, device=device)[:, None] + offsets[None, :]
        columns = (self.before + target.div(self.size, rounding_mode="floor")) * self.width + self.slots
        columns = columns + target.remainder(self.size)
        slots = (self.before * self.width + torch.arange(self.slots, device=device)).expand(self.size, self.slots)
        return torch.cat([slots, columns], dim=1)


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilation: int = 1,
    causal: bool = False,
    key_mask: Tensor | None = None,
    extra_key: Tensor | None = None,
    extra_value: Tensor | None = None,
    extra_mask: Tensor | None = None,
    block: int | None = None,
    need_weights: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sliding-window self-attention of (B, H, S, D) queries/keys/values (same heads, same length).

    ``key_mask``: (B, S) bool, True = real token; a query whose own key is masked outputs zeros (as Hugging
    Face's Longformer does for padding). ``extra_*``: (B, H, E, D) slots every query sees, mask (B, E).
    ``block``: queries per block (a speed/memory knob; results do not depend on it).
    Returns (B, H, S, D) (a token-major view) and, with ``need_weights``, weights (B, H, S, E + window width).
    """
    batch, heads, seq, dim = q.shape
    d = dilation
    slots = 0 if extra_key is None else extra_key.shape[2]
    explicit = need_weights or explicit_dropout(q, dropout_p)
    lay = BlockLayout.choose(window, causal, -(-seq // d), slots, block, explicit)
    c, n = lay.size, lay.blocks
    total = n * c * d
    valid = torch.ones(batch, seq, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.to(torch.bool)
    valid = F.pad(valid, (0, total - seq))
    sub_valid = valid.view(batch, n, c, d).permute(0, 3, 1, 2)  # (B, d, n, c)

    def token_major(x: Tensor) -> Tensor:  # (B, H, S, D) -> (B, n, c, d, H, D), a view when x came from a projection
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, 0, 0, total - seq)) if total != seq else x
        return x.reshape(batch, n, c, d, heads, dim)

    def key_blocks(x: Tensor, extra: Tensor | None) -> Tensor:  # -> (B, d, blocks, width, H, D), one copy
        blocks = x.new_empty(batch, d, n + lay.before + lay.after, lay.width, heads, dim)
        blocks[:, :, :lay.before].zero_()  # keys before the start and after the end: masked, but finite
        blocks[:, :, lay.before + n:].zero_()
        blocks[:, :, lay.before:lay.before + n, slots:] = token_major(x).permute(0, 3, 1, 2, 4, 5)
        if extra is not None:
            blocks[:, :, :, :slots] = extra.transpose(1, 2)[:, None, None]
        return blocks

    def windows(x: Tensor) -> Tensor:  # (blocks, width, H, D) -> (n, H, keys, D): overlapping strided view
        return x.reshape(-1, heads, dim).unfold(0, lay.keys, lay.width).permute(0, 1, 3, 2)

    queries = token_major(q)
    keys, values = key_blocks(k, extra_key), key_blocks(v, extra_value)
    mask = _block_mask(lay, sub_valid, extra_mask, None if need_weights else q.dtype)
    offsets = torch.arange(-lay.reach, (0 if causal else lay.reach) + 1, device=q.device)
    columns = lay.window_columns(offsets) if need_weights else None
    outs, weights = [], []
    for b in range(batch):
        for r in range(d):
            args = (queries[b, :, :, r].transpose(1, 2), windows(keys[b, r]), windows(values[b, r]), mask[b, r, :, None])
            if explicit:
                out, w = dense_attention(*args, dropout_p, scale)
                if columns is not None:
                    weights.append(w.gather(-1, columns.expand(n, heads, *columns.shape)).transpose(1, 2))
            else:
                out = F.scaled_dot_product_attention(*args, dropout_p=dropout_p, scale=scale)
            outs.append(out.transpose(1, 2))  # (n, c, H, D)

    def unblock(parts: list[Tensor]) -> Tensor:  # B * d pieces of (n, c, H, X) -> (B, H, S, X)
        if d == 1:
            x = parts[0][None] if len(parts) == 1 else torch.stack(parts)  # (B, n, c, H, X)
        else:  # interleave the d subsequences back, each written into place: one copy, not stack + permute
            x = parts[0].new_empty(batch, n, c, d, heads, parts[0].shape[-1])
            for i, part in enumerate(parts):
                x[i // d, :, :, i % d] = part
        x = x.reshape(batch, total, heads, -1)[:, :seq]
        if key_mask is not None:
            hidden = ~valid[:, :seq, None, None]
            x = torch.where(hidden, 0, x) if torch.is_grad_enabled() else x.masked_fill_(hidden, 0)
        return x.transpose(1, 2)

    if not need_weights:
        return unblock(outs), None
    weights_out = unblock(weights)
    cut = window - lay.reach  # offsets past the sequence's ends: no key there, weight 0
    if cut:
        local = F.pad(weights_out[..., slots:], (cut, 0 if causal else cut))
        weights_out = torch.cat([weights_out[..., :slots], local], dim=-1)
    return unblock(outs), weights_out


def _block_mask(lay: BlockLayout, sub_valid: Tensor, extra_mask: Tensor | None, dtype: torch.dtype | None) -> Tensor:
    """(B, d, n, c, keys): the band, real keys only, each block's own copy of the extra slots.

    Bool (``dtype`` None) for the explicit path. For SDPA an additive mask in ``dtype``, made in one pass
    (SDPA would otherwise convert a bool mask itself, every call): each part adds half the most negative
    value, so a row with no visible key (a padded query) stays finite; that output is zeroed afterwards.
    """
    batch, d, n, c = sub_valid.shape
    key_ok = F.pad(sub_valid, (0, 0, lay.before, lay.after))  # (B, d, blocks, c)
    if lay.slots:
        extra_ok = torch.ones(batch, lay.slots, dtype=torch.bool, device=sub_valid.device) if extra_mask is None \
            else extra_mask.to(torch.bool)
        key_ok = torch.cat([extra_ok[:, None, None].expand(batch, d, key_ok.shape[2], lay.slots), key_ok], dim=3)
    key_ok = key_ok.unfold(2, lay.before + 1 + lay.after, 1).transpose(3, 4).reshape(batch, d, n, 1, lay.keys)
    band = lay.band(sub_valid.device)
    if dtype is not None:
        low = torch.finfo(dtype).min / 2
        key_bias = torch.zeros(key_ok.shape, dtype=dtype, device=band.device).masked_fill_(~key_ok, low)
        return key_bias + torch.zeros(band.shape, dtype=dtype, device=band.device).masked_fill_(~band, low)
    # A query whose own key is masked could see nothing (NaN); it sees itself, and its output is zeroed.
    return (key_ok & band) | (~sub_valid[..., None] & lay.own_key(sub_valid.device))


def window_to_dense(
    weights: Tensor, window: int, dilation: int | Sequence[int] = 1, causal: bool = False, slots: int = 0
) -> Tensor:
    """Window-layout weights (B, H, S, slots + width) -> dense (B, H, S, slots + S); for plots and tests.

    ``dilation`` may be one value or one per head. Offsets that fall outside the sequence are dropped.
    """
    batch, heads, seq, _ = weights.shape
    dilations = [dilation] * heads if isinstance(dilation, int) else list(dilation)
    offsets = torch.arange(-window, (0 if causal else window) + 1, device=weights.device)
    step = torch.tensor(dilations, device=weights.device)[:, None, None]  # (H, 1, 1)
    keys = torch.arange(seq, device=weights.device)[None, :, None] + offsets[None, None, :] * step  # (H, S, W)
    inside = (keys >= 0) & (keys < seq)
    dense = weights.new_zeros(batch, heads, seq, slots + seq + 1)  # last column collects outside offsets
    index = torch.where(inside, keys + slots, slots + seq).expand(batch, heads, seq, offsets.numel())
    dense.scatter_add_(-1, index, weights[..., slots:] * inside)
    dense[..., :slots] = weights[..., :slots]
    return dense[..., :-1]
