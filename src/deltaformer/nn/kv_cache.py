"""A preallocated key/value cache for incremental decoding, shared by every decoder model.

One buffer per layer is allocated up front (``[batch, kv_heads, max_length, head_dim]`` for keys and values),
so a decoding step writes its new keys in place instead of concatenating (which copies the whole past every
step and fragments memory). Attention reads the filled prefix as a view.

Layers fill the cache one after another within a forward, so each layer keeps its own fill level;
:attr:`KVCache.length` is the number of positions every layer holds (what a model needs to place new
tokens). Rows can be reordered or dropped (beam search, finished sequences) and the cache cropped (undoing
speculative or rejected tokens).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..errors import InputError


class CacheLayer(Protocol):
    """What an attention layer needs of a cache: append this step's keys/values, get all of them back."""

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class LayerCache:
    """One layer's slice of a :class:`KVCache`: appends at its own fill level."""

    def __init__(self, owner: KVCache, index: int) -> None:
        self.owner = owner
        self.index = index
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ([B, n_kv, T, D]) after the stored positions; return keys/values of all of them."""
        keys, values = self.owner.keys[self.index], self.owner.values[self.index]
        start, steps = self.length, k.shape[2]
        end = start + steps
        if end > keys.shape[2]:
            raise InputError(f"the KV cache holds {keys.shape[2]} positions and {start} are used: {steps} more do "
                             "not fit; make the cache with a larger max_length (prompt + new tokens)")
        if k.shape[0] != keys.shape[0] or k.shape[1] != keys.shape[1] or k.shape[3] != keys.shape[3]:
            raise InputError(f"keys of shape {tuple(k.shape)} do not fit a cache of [batch={keys.shape[0]}, "
                             f"kv_heads={keys.shape[1]}, head_dim={keys.shape[3]}]: make the cache with "
                             "model.new_cache(batch, max_length)")
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.length = end
        return keys[:, :, :end], values[:, :, :end]


class KVCache:
    """Keys and values of every decoder layer, preallocated for ``max_length`` positions."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_length: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if min(n_layers, batch, max_length, n_kv_heads, head_dim) < 1:
            raise InputError(f"a KV cache needs positive sizes, got layers={n_layers}, batch={batch}, "
                             f"max_length={max_length}, kv_heads={n_kv_heads}, head_dim={head_dim}")
        shape = (n_layers, batch, n_kv_heads, max_length, head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [LayerCache(self, i) for i in range(n_layers)]
        #: (batch, 1) shift a model adds to mask-derived positions on every step after the first (prefix
        #: tuning starts positions after its slots); None: no shift. Kept in step with the rows.
        self.position_offset: Tensor | None = None

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    @property
    def length(self) -> int:
        """Positions every layer holds (the first layer may be ahead inside a forward)."""
        return min(layer.length for layer in self.layers)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows ``rows`` (a LongTensor, repeats allowed) in that order: beam search picks parents,
        finished sequences are dropped. The batch size becomes ``len(rows)``."""
        rows = self._checked(rows)
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        if self.position_offset is not None:
            self.position_offset = self.position_offset.index_select(0, rows.to(self.position_offset.device))

    def _checked(self, rows: Tensor) -> Tensor:
        rows = rows.to(device=self.keys.device, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.batch):
            raise InputError(f"cache rows {rows.tolist()} are outside the batch of {self.batch}")
        return rows

    def take(self, rows: Tensor) -> KVCache:
        """A new cache holding rows ``rows`` of this one (repeats allowed), at the same fill levels; this one
        is unchanged (several continuations of one prompt, a chunk at a time)."""
        rows = self._checked(rows)
        taken = KVCache.__new__(KVCache)
        taken.keys = self.keys.index_select(1, rows)
        taken.values = self.values.index_select(1, rows)
        taken.layers = [LayerCache(taken, i) for i in range(len(self.layers))]
        for mine, theirs in zip(taken.layers, self.layers):
            mine.length = theirs.length
        taken.position_offset = (None if self.position_offset is None
                                 else self.position_offset.index_select(0, rows.to(self.position_offset.device)))
        return taken

    @property
    def row_bytes(self) -> int:
        """Memory one batch row takes (keys and values of every layer, the whole preallocated length)."""
        return 2 * self.keys[:, 0].numel() * self.keys.element_size()

    def grow(self, n: int) -> None:
        """Make room for ``n`` more positions (stored ones are kept): a prompt delta's soft tokens take
        positions the caller did not size the cache for."""
        if n <= 0:
            return
        stored = max(layer.length for layer in self.layers)
        shape = (*self.keys.shape[:3], self.max_length + n, self.keys.shape[4])
        keys, values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
        keys[:, :, :, :stored] = self.keys[:, :, :, :stored]
        values[:, :, :, :stored] = self.values[:, :, :, :stored]
        self.keys, self.values = keys, values

    def crop(self, n: int) -> None:
        """Forget every position from ``n`` on (negative: drop that many from the end)."""
        length = self.length
        keep = length + n if n < 0 else n
        if not 0 <= keep <= length:
            raise InputError(f"cannot crop a cache of {length} positions to {n}")
        for layer in self.layers:
            layer.length = keep
