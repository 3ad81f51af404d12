"""Decoding sessions: a model, its key/value cache and its masks, advanced one step for a whole batch.

A session hides what differs between model families behind four calls the searches use:
``prefill(ids, mask) -> logits`` (the prompt; for an encoder-decoder, the encoder pass and the start token),
``step(tokens) -> logits`` (one new token per row), ``keep(rows)`` (rows survive in this order: beam search
picks parents, finished rows drop) and, for decoder-only models, ``merge(other)`` (rows prefilled apart join
a running batch). Logits come back as fp32 (B, V) for the next token.

Every model forward runs inside ``forward_context(row_ids)``, where ``row_ids`` names the batch's rows in
order: per-sample delta routing enters ``delta.route`` there, so routing follows rows however they move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..nn.kv_cache import KVCache

if TYPE_CHECKING:
    from ..models.decoder import DecoderTaskModel
    from ..models.led import LEDDecoderLayer, LEDForConditionalGeneration

ForwardContext = Callable[[list[int]], AbstractContextManager[Any]]


def _causal(model: nn.Module) -> DecoderTaskModel:
    """``model`` as the causal LM it is (``new_session`` checked it has ``new_cache``)."""
    return cast("DecoderTaskModel", model)


def _seq2seq(model: nn.Module) -> LEDForConditionalGeneration:
    """``model`` as the encoder-decoder it is (LED; :func:`is_encoder_decoder` checked its backbone)."""
    return cast("LEDForConditionalGeneration", model)


def no_context(rows: list[int]) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def is_encoder_decoder(model: nn.Module) -> bool:
    backbone = getattr(model, "backbone", None)
    return all(hasattr(backbone, name) for name in ("encode", "memories", "decode"))


def context_window(model: nn.Module) -> int | None:
    """Positions a decoder can attend over: the decoder's of an encoder-decoder, else the model's."""
    if is_encoder_decoder(model):
        return _seq2seq(model).config.max_decoder_position_embeddings
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None
             ) -> tuple[Tensor, Tensor]:
    """(ids, mask) of ``prompts`` left-padded to the longest: every row's last token is its newest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token: drop empty prompts or add a BOS token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class CausalSession:
    """A decoder-only model (GPT-2, Llama) over one preallocated :class:`~deltaformer.nn.kv_cache.KVCache`.

    Rows are left-padded, so they share one cache length; ``mask`` (B, cache length) marks real positions
    and ``positions`` (B,) is each row's next position id (counted over real tokens only, as HF does).
    """

    def __init__(self, model: nn.Module, rows: list[int], forward_context: ForwardContext | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.rows = list(rows)
        self.context = forward_context or no_context
        self.dtype = dtype
        self.cache: Any = None
        self.mask: Tensor | None = None
        self.positions: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor | None) -> Any:
        with self.context(list(self.rows)):
            return self.model(ids, attention_mask=mask, position_ids=positions, cache=self.cache, last_only=True)

    def prefill(self, ids: Tensor, mask: Tensor, room: int, repeat: int = 1) -> Tensor:
        """Run the prompts (left-padded ``ids``/``mask``, each row ``repeat`` times for beams, as HF expands
        them before its first forward) into a new cache with ``room`` free positions."""
        if repeat > 1:
            ids, mask = ids.repeat_interleave(repeat, dim=0), mask.repeat_interleave(repeat, dim=0)
            self.rows = [r for r in self.rows for _ in range(repeat)]
        batch, width = ids.shape
        self.cache = _causal(self.model).new_cache(batch, width + room, dtype=self.dtype, device=ids.device)
        out = self._forward(ids, mask, None)  # positions from the mask, shifted by a prefix delta if any
        self._after_prefill(out, mask)
        return out.logits[:, -1].float()

    def _after_prefill(self, out: Any, mask: Tensor) -> None:
        """Take the mask the cache now holds: the one passed, or an input-side delta's extended one."""
        stored = self.cache.length
        extended = getattr(out, "attention_mask", None)
        if extended is not None and extended.shape[1] == stored:
            mask = extended
        elif stored != mask.shape[1]:
            raise InputError(f"the model stored {stored} positions for a prompt of {mask.shape[1]} and returned no "
                             "attention_mask covering them: it cannot be decoded incrementally")
        self.mask = mask.long()
        self.positions = self.mask.sum(-1)  # a prefix delta's shift is the cache's ``position_offset``

    def step(self, tokens: Tensor) -> Tensor:
        """Feed each row's newest token (B,); next-token logits."""
        assert self.mask is not None and self.positions is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = self._forward(tokens[:, None], self.mask, self.positions[:, None])
        self.positions = self.positions + 1
        return out.logits[:, -1].float()

    def room(self) -> int:
        return self.cache.max_length - self.cache.length

    def keep(self, rows: Tensor) -> None:
        """Continue with batch rows ``rows`` (indices into the current batch; repeats allowed)."""
        assert self.mask is not None and self.positions is not None
        self.cache.reorder(rows)
        rows_dev = rows.to(self.mask.device)
        self.mask, self.positions = self.mask.index_select(0, rows_dev), self.positions.index_select(0, rows_dev)
        self.rows = [self.rows[i] for i in rows.tolist()]

    def merge(self, other: CausalSession, room: int) -> None:
        """Append ``other``'s rows after this session's (right-aligned), dropping columns no row uses.

        One new cache holds both: its length is the longest real span among all rows, plus ``room``.
        """
        parts = [s for s in (self, other) if s.mask is not None and s.mask.shape[0] > 0]
        masks = [s.mask for s in parts if s.mask is not None]  # every part's, in order (filtered above)
        spans = [int((m.cumsum(-1) == 0).sum(-1).min()) for m in masks]  # leading all-pad columns
        width = max(s.length - lead for s, lead in zip(parts, spans))
        batch = sum(m.shape[0] for m in masks)
        first = parts[0]
        cache = _causal(self.model).new_cache(batch, width + room, dtype=first.cache.dtype, device=first.cache.device)
        keys = first.cache.keys.new_zeros(first.cache.keys.shape[0], batch, first.cache.keys.shape[2], width,
                                          first.cache.keys.shape[4])
        values = torch.zeros_like(keys)
        mask = masks[0].new_zeros(batch, width)
        row = 0
        for s, s_mask in zip(parts, masks):
            n, stored = s_mask.shape[0], s.length
            take = min(width, stored)
            keys[:, row:row + n, :, width - take:] = s.cache.keys[:, :, :, stored - take:stored]
            values[:, row:row + n, :, width - take:] = s.cache.values[:, :, :, stored - take:stored]
            mask[row:row + n, width - take:] = s_mask[:, stored - take:]
            row += n
        for i in range(keys.shape[0]):
            cache.layer(i).update(keys[i], values[i])
        offsets = [s.cache.position_offset for s in parts]  # prefix tuning's per-row position shift
        if any(o is not None for o in offsets):
            cache.position_offset = torch.cat([o if o is not None else m.new_zeros(m.shape[0], 1)
                                               for o, m in zip(offsets, masks)])
        self.cache, self.mask = cache, mask
        self.positions = torch.cat([s.positions for s in parts])  # type: ignore[misc]
        self.rows = [r for s in parts for r in s.rows]

    def compact(self, room: int) -> None:
        """Drop leading columns every row has as padding, and make ``room`` free positions (one copy)."""
        empty = CausalSession(self.model, [], self.context, self.dtype)
        self.merge(empty, room)


class Seq2SeqSession:
    """An encoder-decoder (LED): the encoder runs once; the decoder starts from ``decoder_start_token_id``.

    The encoder's output keys/values (``memories``) and mask follow the rows through :meth:`keep`.
    """

    def __init__(self, model: nn.Module, rows: list[int], forward_context: ForwardContext | None = None,
                 global_attention_mask: Tensor | None = None) -> None:
        self.model = model
        self.rows = list(rows)
        self.context = forward_context or no_context
        self.global_attention_mask = global_attention_mask
        self.start = _seq2seq(model).config.decoder_start_token_id
        self.cache: Any = None
        self.memories: list[tuple[Tensor, Tensor]] = []
        self.memory_mask: Tensor | None = None

    def prefill(self, ids: Tensor, mask: Tensor | None, room: int, repeat: int = 1) -> Tensor:
        """Encode once, then (after repeating each row ``repeat`` times, for beams) feed the start token."""
        backbone = _seq2seq(self.model).backbone
        with self.context(list(self.rows)):
            encoded = backbone.encode(ids, mask, self.global_attention_mask).last_hidden_state
        if repeat > 1:
            encoded = encoded.repeat_interleave(repeat, dim=0)
            mask = None if mask is None else mask.repeat_interleave(repeat, dim=0)
            self.rows = [r for r in self.rows for _ in range(repeat)]
        with self.context(list(self.rows)):
            self.memories = backbone.memories(encoded)
        self.memory_mask = mask
        self.cache = self._new_cache(encoded.shape[0], 1 + room, encoded)
        return self.step(torch.full((encoded.shape[0],), self.start, dtype=torch.long, device=ids.device))

    def _new_cache(self, batch: int, length: int, like: Tensor) -> Any:
        decoder = _seq2seq(self.model).backbone.decoder
        attn = cast("LEDDecoderLayer", decoder.layers[0]).self_attn
        return KVCache(len(decoder.layers), batch, length, attn.n_kv_heads, attn.head_dim, like.dtype, like.device)

    def step(self, tokens: Tensor) -> Tensor:
        layers = [self.cache.layer(i) for i in range(len(self.memories))]
        with self.context(list(self.rows)):
            model = _seq2seq(self.model)
            hidden = model.backbone.decode(tokens[:, None], self.memories, self.memory_mask,
                                           caches=layers).last_hidden_state
            assert hidden is not None  # the decoder always returns its last hidden state
            return model.logits(hidden[:, -1]).float()

    def room(self) -> int:
        return self.cache.max_length - self.cache.length

    def compact(self, room: int) -> None:
        raise InputError("the decoder reached its last position: lower max_new_tokens")

    def keep(self, rows: Tensor) -> None:
        self.cache.reorder(rows)
        self.memories = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.memories]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)
        self.rows = [self.rows[i] for i in rows.tolist()]



def new_session(model: nn.Module, rows: list[int], forward_context: ForwardContext | None = None,
                global_attention_mask: Tensor | None = None, dtype: torch.dtype | None = None
                ) -> CausalSession | Seq2SeqSession:
    if is_encoder_decoder(model):
        return Seq2SeqSession(model, rows, forward_context, global_attention_mask)
    if not hasattr(model, "new_cache"):
        raise InputError(f"{type(model).__name__} has no decoder to generate with: use a causal LM (GPT-2, Llama) "
                         "or an encoder-decoder (LED)")
    return CausalSession(model, rows, forward_context, dtype)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration (the caller's mode comes back after)."""
    if not any(m.training for m in model.modules()):  # already eval (every decode step): no mode to switch
        with torch.no_grad():
            yield
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
