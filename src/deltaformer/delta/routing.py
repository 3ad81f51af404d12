"""Which deltas the next forward uses: the :class:`DeltaRouter` all parts of one model share.

The router holds the attached deltas (name -> method and config), the active ones, the merged ones (in
merge order), whether a :meth:`~DeltaRouter.bare` block is open, and the per-sample names of an open
:meth:`~DeltaRouter.routing` block. It hands each part a :class:`Selection` computed from that state and
the part's own slot names; a part then gathers its slices by the selection's index.

Selections are cached, keyed by everything they are computed from that a part owns (its slot names, its
merged names, the batch size when routing, the device) and by the per-sample names of an open routing
block (so decoding, which enters the same routing on every step, computes each part's index once).
Everything else the router owns changes only through its methods, and each of them drops the cache, so no
caller has to remember to: a cached selection is valid by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ..errors import DeltaError
from .config import DeltaConfig

#: Most selections kept (each part's, for each routing seen since the router's state last changed).
CACHE_SIZE = 4096

#: Slot index a routed sample uses for "no delta" (the bare model), and the position route() accepts for it.
BARE = -1


@dataclass(frozen=True)
class Selection:
    """Which slots of one part apply to the current batch. Exactly one form is set:

    * ``slot``: every sample uses this slot (the fast path: no gather);
    * ``slots``: every sample uses all of these (several active deltas of one method, composed);
    * ``index``: routed, ``index[b]`` is sample b's slot (clamped to a valid slot), ``keep[b]`` is 0.0 for
      samples whose delta is not in this part (None when every sample's is); ``used`` lists the slots used.
    """

    slot: int | None = None
    slots: tuple[int, ...] = ()
    index: Tensor | None = None
    keep: Tensor | None = None
    used: tuple[int, ...] = ()

    @property
    def each(self) -> tuple[int, ...]:
        """Slots applied to every sample (fast path and composition)."""
        return (self.slot,) if self.slot is not None else self.slots

    def keep_like(self, x: Tensor, dims: int = 0) -> Tensor | None:
        """``keep`` as x's dtype with ``dims`` trailing singleton dims, or None when all samples keep."""
        if self.keep is None:
            return None
        return self.keep.to(x.dtype).view(-1, *([1] * dims))


@dataclass(frozen=True)
class DeltaInfo:
    """An attached delta: the name of its method and the config it was attached with."""

    method: str
    config: DeltaConfig


class DeltaRouter:
    """Shared by every part of one model: the attached deltas and which of them the next forward uses.

    Read its state through the properties (read-only views); change it only through the methods.
    """

    def __init__(self) -> None:
        self._deltas: dict[str, DeltaInfo] = {}
        self._active: tuple[str, ...] = ()
        self._merged: dict[str, None] = {}  # in merge order: unmerge() undoes them in reverse
        self._routed: tuple[str | None, ...] | None = None
        self._bare = 0
        self._cache: dict[Any, Selection | None] = {}

    # --- state (read-only) -------------------------------------------------------------------------

    @property
    def deltas(self) -> Mapping[str, DeltaInfo]:
        """Attached deltas by name, in attach order."""
        return MappingProxyType(self._deltas)

    @property
    def active(self) -> tuple[str, ...]:
        """Deltas applied to every sample when no routing block is open."""
        return self._active

    @property
    def merged(self) -> tuple[str, ...]:
        """Deltas folded into the base weights, in merge order."""
        return tuple(self._merged)

    @property
    def routed(self) -> tuple[str | None, ...] | None:
        """The per-sample delta names of the open routing block, or None."""
        return self._routed

    # --- changes ------------------------------------------------------------------------------------

    def add(self, name: str, method: str, config: DeltaConfig) -> None:
        """Record a newly attached delta (not yet active)."""
        self._deltas[name] = DeltaInfo(method, config)
        self._changed()

    def remove(self, name: str) -> None:
        """Forget delta ``name``: it is no longer attached, active or merged."""
        self._deltas.pop(name, None)
        self._active = tuple(n for n in self._active if n != name)
        self._merged.pop(name, None)
        self._changed()

    def clear(self) -> None:
        """Forget every delta (unload)."""
        self._deltas.clear()
        self._active = ()
        self._merged.clear()
        self._changed()

    def replace_config(self, name: str, config: DeltaConfig) -> None:
        """The config of delta ``name`` changed meaning (a prefix MLP exported to plain slots)."""
        self._deltas[name] = DeltaInfo(self._deltas[name].method, config)

    def activate(self, names: Sequence[str]) -> None:
        """Apply these deltas to every sample (several compose; empty = bare)."""
        names = tuple(names)
        self.check_names(names)
        self._active = names
        self._changed()

    def record_merge(self, name: str) -> None:
        self._merged[name] = None
        self._changed()

    def record_unmerge(self, name: str) -> None:
        self._merged.pop(name, None)
        self._changed()

    @contextmanager
    def routing(self, names: Sequence[str | None]) -> Iterator[None]:
        """Inside the block, sample b of every forward uses delta ``names[b]`` (None: the bare model)."""
        names = tuple(names)
        self.check_names(names)
        self.refuse_merged("route samples to deltas")
        saved = self._routed
        self._routed = names  # part of the selection cache's key: re-entering the same routing hits the cache
        try:
            yield
        finally:
            self._routed = saved

    @contextmanager
    def bare(self) -> Iterator[None]:
        """Inside the block no delta applies (blocks nest)."""
        self.refuse_merged("run the bare model")
        self._bare += 1
        self._changed()
        try:
            yield
        finally:
            self._bare -= 1
            self._changed()

    def snapshot(self) -> Callable[[], AbstractContextManager[None]]:
        """A factory of a context that puts back today's selection state (active deltas, routing, bare) while
        it is open: what a layer recomputed in the backward (gradient checkpointing) needs, since the backward
        may run after the forward's routing block closed."""
        state = (self._active, self._routed, self._bare)

        @contextmanager
        def restored() -> Iterator[None]:
            saved = (self._active, self._routed, self._bare)
            if saved == state:
                yield
                return
            self._active, self._routed, self._bare = state
            self._changed()
            try:
                yield
            finally:
                self._active, self._routed, self._bare = saved
                self._changed()

        return restored

    def _changed(self) -> None:
        self._cache.clear()

    # --- checks -------------------------------------------------------------------------------------

    def position(self, name: str) -> int:
        return list(self._deltas).index(name)

    def check_names(self, names: Sequence[str | None]) -> None:
        for name in names:
            if name is not None and name not in self._deltas:
                raise DeltaError(f"no delta named {name!r} is attached: attached are {', '.join(self._deltas) or 'none'}")

    def refuse_merged(self, what: str) -> None:
        if self._merged:
            raise DeltaError(f"cannot {what} while delta(s) {', '.join(sorted(self._merged))} are merged into the "
                             "base weights: unmerge(model, name) first")

    # --- selections ---------------------------------------------------------------------------------

    def select(self, slots: Sequence[str], merged: set[str], batch: int, device: torch.device) -> Selection | None:
        """The :class:`Selection` of a part holding ``slots`` for a batch of ``batch`` samples, or None."""
        if self._bare or not slots:
            return None
        key = (tuple(slots), frozenset(merged), (self._routed, batch) if self._routed is not None else None, device)
        if key in self._cache:
            return self._cache[key]
        if len(self._cache) >= CACHE_SIZE:  # many different routings (a server's changing batches): start over
            self._cache.clear()
        if self._routed is not None:
            sel = self._routed_selection(slots, batch, device)
        else:
            each = tuple(i for i, n in enumerate(slots) if n in self._active and n not in merged)
            sel = None if not each else Selection(slot=each[0]) if len(each) == 1 else Selection(slots=each)
        self._cache[key] = sel
        return sel

    def _routed_selection(self, slots: Sequence[str], batch: int, device: torch.device) -> Selection | None:
        names = self._routed
        assert names is not None
        if len(names) != batch:
            raise DeltaError(f"route() names {len(names)} sample(s) but the batch has {batch}: give one name per sample")
        where = {n: i for i, n in enumerate(slots)}
        local = [where.get(n, BARE) if n is not None else BARE for n in names]
        used = sorted(set(local) - {BARE})
        if not used:
            return None
        if len(set(local)) == 1:
            return Selection(slot=local[0])
        index = torch.tensor([max(i, 0) for i in local], dtype=torch.long, device=device)
        keep = None
        if BARE in local:
            keep = torch.tensor([float(i != BARE) for i in local], device=device)
        return Selection(index=index, keep=keep, used=tuple(used))
