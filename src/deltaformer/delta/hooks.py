"""Input-side deltas (prompt tuning, P-tuning, prefix positions) share the backbone's ``prompt`` hook.

:class:`PromptChain` is installed as ``backbone.prompt`` and runs each method's store in a fixed order:
P-tuning (may replace placeholder embeddings, so it needs the input ids), prompt tuning (prepends), then
prefix tuning (only shifts position ids past its key/value slots, as HF does for a KV prefix).

Per-sample prepending keeps every sample's own layout ``[its soft tokens, its input, padding]``: its real
tokens sit at the positions they would have alone, so each sample's output (positions ``0 .. k_i + S``)
equals running it alone; the extra padding at the end is masked out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..errors import DeltaError
from .host import backbone_of
from .parts import StackedDelta

#: Order in which input-side stores run.
CHAIN_ORDER = ("ptuning", "prompt", "prefix")

#: What the prompt hook passes along: embeddings, attention mask, token types, position ids (or None).
Prompted = tuple[Tensor, Tensor, Tensor, Tensor | None]


class InputStore(StackedDelta, ABC):
    """What an input-side method's store must provide (prompt tuning, P-tuning, prefix positions).

    (``prompt_input``, not ``apply``: ``nn.Module.apply(fn)`` visits every submodule, so a store must not
    shadow it.)
    """

    @abstractmethod
    def prompt_input(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor, types: Tensor,
              positions: Tensor | None) -> Prompted:
        """Change the embedded input for this batch's selection; ``input_ids`` is None once an earlier
        store changed the sequence length (ids no longer line up with embeddings)."""


class PromptChain(nn.Module):
    """``prompt(input_ids, embeds, mask, token_types) -> (embeds, mask, token_types, position_ids | None)``."""

    def stores(self) -> list[InputStore]:
        return [store for m in CHAIN_ORDER if isinstance(store := self._modules.get(m), InputStore)]

    def forward(self, input_ids: Tensor | None, embeds: Tensor, mask: Tensor, types: Tensor) -> Prompted:
        positions = None
        length = embeds.shape[1]
        for store in self.stores():
            ids = input_ids if embeds.shape[1] == length else None
            embeds, mask, types, positions = store.prompt_input(ids, embeds, mask, types, positions)
        return embeds, mask, types, positions


S = TypeVar("S", bound=InputStore)


def chain_store(model: nn.Module, method: str, kind: type[S], make: Callable[[], S]) -> S:
    """The input-side store of ``method`` on the model's backbone, created (with the chain) on first use."""
    backbone = backbone_of(model)
    chain = backbone.prompt_hook()
    if chain is None:
        chain = PromptChain()
        backbone.set_prompt_hook(chain)
    elif not isinstance(chain, PromptChain):
        raise DeltaError(f"the backbone's prompt hook is already a {type(chain).__name__}: remove it before "
                         "attaching prompt-based deltas")
    store = chain._modules.get(method)
    if store is None:
        store = make()
        chain.add_module(method, store)
    assert isinstance(store, kind)
    return store


def find_store(model: nn.Module, method: str, kind: type[S]) -> S | None:
    try:
        chain = backbone_of(model).prompt_hook()
    except DeltaError:
        return None
    store = chain._modules.get(method) if isinstance(chain, PromptChain) else None
    return store if isinstance(store, kind) else None


def store_holding(model: nn.Module, method: str, name: str, kind: type[S]) -> S:
    """The input-side store of ``method`` that holds delta ``name`` (an attached delta always has one)."""
    store = find_store(model, method, kind)
    if store is None or name not in store.slots:
        raise DeltaError(f"no {method} delta named {name!r} is attached to this model")
    return store


def drop_store_if_empty(model: nn.Module, method: str) -> None:
    backbone = backbone_of(model)
    chain = backbone.prompt_hook()
    if isinstance(chain, PromptChain) and method in chain._modules:
        store = chain._modules[method]
        if isinstance(store, StackedDelta) and not store.slots:
            del chain._modules[method]
            if not chain._modules:
                backbone.set_prompt_hook(None)


def prepend(embeds: Tensor, mask: Tensor, types: Tensor, tokens: Tensor,
            lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Put soft ``tokens`` (B, K, H) before each sample's input; sample b uses its first ``lengths[b]``.

    Without ``lengths`` every sample takes all K (plain concatenation). With them, sample b becomes
    ``[tokens[b, :k_b], input_b, K - k_b padding]`` by one gather: no Python loop over samples.
    """
    batch, seq, hidden = embeds.shape
    k = tokens.shape[1]
    tokens = tokens.to(embeds.dtype)
    ones, zeros = mask.new_ones(batch, k), types.new_zeros(batch, k)
    if lengths is None:
        return torch.cat([tokens, embeds], 1), torch.cat([ones, mask], 1), torch.cat([zeros, types], 1)
    t = torch.arange(k + seq, device=embeds.device)[None, :]
    own = lengths.to(embeds.device)[:, None]
    src = torch.where(t < own, t, t + k - own)  # into [tokens (K), input (S), padding (K)]
    pool = torch.cat([tokens, embeds, embeds.new_zeros(batch, k, hidden)], 1)
    out = pool.gather(1, src[..., None].expand(batch, k + seq, hidden))
    new_mask = torch.cat([ones, mask, mask.new_zeros(batch, k)], 1).gather(1, src)
    new_types = torch.cat([zeros, types, zeros], 1).gather(1, src)
    return out, new_mask, new_types
