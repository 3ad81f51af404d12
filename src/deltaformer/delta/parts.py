"""The stacked store: one method's parameters for every delta of that method at one place, slot by slot.

A store (a *part* when it lives in a wrapped layer, see :mod:`.wrappers`; an *input store* when it runs in
the backbone's prompt hook, see :mod:`.hooks`) stacks each parameter on a leading "delta" axis: slot ``k``
holds delta ``store.slots[k]``. Deltas of different sizes (ranks, lengths) are zero-padded to the largest,
which every method keeps exact. Per-slot Python lists (ranks, scales, lengths) sit beside the stacks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .ops import pad_to
from .routing import DeltaRouter, Selection


class StackedDelta(nn.Module):
    """Base of every method's store: parameters stacked on a leading delta axis, one slot per name.

    Subclasses list their stacked parameters in ``stacked``, the plain per-slot lists they keep beside them
    (ranks, scales, lengths, ...) in ``slot_lists``, and rebuild tensors derived from those lists in
    :meth:`refresh`. What a store must do besides depends on where it lives: :class:`~.wrappers.LayerPart`
    and :class:`~.hooks.InputStore` declare it.
    """

    method: ClassVar[str] = ""
    stacked: ClassVar[tuple[str, ...]] = ()
    slot_lists: ClassVar[tuple[str, ...]] = ()

    def __init__(self, router: DeltaRouter) -> None:
        super().__init__()
        self.router = router
        self.slots: list[str] = []
        self.merged: set[str] = set()

    def select(self, batch: int, device: torch.device) -> Selection | None:
        """Which of this store's slots the next forward applies (None: none of them)."""
        return self.router.select(self.slots, self.merged, batch, device)

    def slot(self, name: str) -> int:
        return self.slots.index(name)

    def stack_add(self, name: str, rows: dict[str, Tensor]) -> int:
        """Append a slot: each row is zero-padded (or the stack is) to the larger trailing shape."""
        for pname, row in rows.items():
            old = getattr(self, pname, None)
            if old is None:
                new = row[None]
            else:
                shape = [max(a, b) for a, b in zip(old.shape[1:], row.shape)]
                new = torch.cat([pad_to(old.detach(), [old.shape[0], *shape]), pad_to(row, shape)[None]])
            grad = True if old is None else old.requires_grad
            self.register_parameter(pname, nn.Parameter(new, requires_grad=grad))
        self.slots.append(name)
        return len(self.slots) - 1

    def stack_remove(self, name: str) -> int:
        """Drop delta ``name``'s slot from every stack and list; later slots move down by one."""
        index = self.slot(name)
        for pname in self.stacked:
            old = getattr(self, pname, None)
            if old is not None:
                keep = [i for i in range(old.shape[0]) if i != index]
                new = old.detach()[keep].clone()
                self.register_parameter(pname, nn.Parameter(new, requires_grad=old.requires_grad))
        for attr in self.slot_lists:
            getattr(self, attr).pop(index)
        self.slots.pop(index)
        self.merged.discard(name)
        self.refresh()
        return index

    def refresh(self) -> None:
        """Rebuild tensors derived from the per-slot lists, after a slot was added or removed."""

    def slot_numel(self, slot: int) -> int:
        """Parameters delta ``slot`` really has here (without padding)."""
        return sum(getattr(self, p)[slot].numel() for p in self.stacked if getattr(self, p, None) is not None)
