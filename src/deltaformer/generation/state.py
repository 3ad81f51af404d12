"""Step-level decoding for a changing batch: rows join (prefill), advance together, and leave.

:class:`DecodeState` is what continuous batching builds on, and what :func:`~deltaformer.generation.generate`
runs for greedy and sampled search, so a row decoded in a busy batch gets the ids it gets alone. Each row
keeps its own settings (:class:`~deltaformer.generation.GenerationConfig`), its own random generator seeded
from its ``seed``, its own stopping rules, and its own delta when ``forward_context`` routes one per row.

One step: choose every live row's token from its pending logits, report it (an :class:`Event`), drop the rows
that ended, then run one forward of the remaining rows to get their next logits. Rows that join are prefilled
in one batched forward of their own and merged into the running cache; the merged cache drops the columns no
live row uses, so it never grows past the longest live row plus what it may still generate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .config import GenerationConfig
from .processors import RowSettings, choose, mark_seen, process, seen_tokens
from .sessions import CausalSession, ForwardContext, context_window, evaluating, left_pad
from .text import IncrementalText

log = logging.getLogger(__name__)


class Event(NamedTuple):
    """One row's new token; ``finished`` is None, "stop" (eos or a stop string) or "length"."""

    row: int
    token: int
    finished: str | None


@dataclass
class _Row:
    config: GenerationConfig
    generator: torch.Generator | None
    eos: frozenset[int]
    limit: int  # tokens this row may generate
    text: IncrementalText | None
    tokens: list[int] = field(default_factory=list)


def fit_prompt(prompt: Sequence[int], new_tokens: int, window: int | None, truncate: bool) -> list[int]:
    """``prompt`` if it and ``new_tokens`` fit ``window``; cut from the left (with a warning) if asked, else an
    error saying by how much it is too long."""
    prompt = list(prompt)
    if window is None or len(prompt) + new_tokens <= window:
        return prompt
    room = window - new_tokens
    if not truncate or room < 1:
        raise InputError(f"the prompt has {len(prompt)} tokens and {new_tokens} new ones are asked for, but the "
                         f"context window is {window}: shorten the prompt, lower max_new_tokens, or pass "
                         "truncate_prompt=True (--truncate) to drop the prompt's oldest tokens")
    log.warning("prompt of %d tokens cut to its last %d to fit the context window of %d with %d new tokens",
                len(prompt), room, window, new_tokens)
    return prompt[-room:]


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own generator: from ``seed``, else from torch's global generator (so manual_seed governs it)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed)
    return generator


class DecodeState:
    """Rows of a decoder-only model decoded together; see the module docstring.

    ``capacity``: most rows live at once. ``max_length``: most positions a row may reach (prompt + new; at
    most the model's context window). ``forward_context(tags)`` is entered around every forward with the
    tags of the batch's rows in order (per-row delta routing: a row's tag is what :meth:`add` got for it,
    e.g. its delta's name; by default its row id). ``tokenizer`` is needed for stop strings and :meth:`text`.
    """

    def __init__(self, model: nn.Module, capacity: int, max_length: int | None = None, tokenizer: Any = None,
                 forward_context: ForwardContext | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        window = context_window(model)
        if max_length is None:
            max_length = window
        if max_length is None or max_length < 2 or capacity < 1:
            raise ConfigError(f"DecodeState needs capacity >= 1 and max_length >= 2, got {capacity}, {max_length}")
        if window is not None and max_length > window:
            raise ConfigError(f"max_length {max_length} exceeds the model's context window of {window}")
        self.model = model
        self.capacity = capacity
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._user_context = forward_context
        self._tags: dict[int, Any] = {}
        self.dtype = dtype
        self.session: Any = self._empty_session()
        self._rows: dict[int, _Row] = {}
        self._next_id = 0
        self._logits: Tensor | None = None  # pending next-token logits, one row per live row
        self._settings: RowSettings | None = None
        self._seen: Tensor | None = None  # (B, V) tokens each row has seen (repetition penalty)
        self._vocab: int | None = None

    def _empty_session(self) -> CausalSession:
        return CausalSession(self.model, [], self._context if self._user_context else None, self.dtype)

    def _context(self, rows: list[int]) -> Any:
        assert self._user_context is not None
        return self._user_context([self._tags.get(r, r) for r in rows])

    # --- membership ------------------------------------------------------------------------------

    @property
    def rows(self) -> list[int]:
        return list(self.session.rows)

    def __len__(self) -> int:
        return len(self.session.rows)

    def tokens(self, row: int) -> list[int]:
        return list(self._row(row).tokens)

    def text(self, row: int) -> str:
        """The row's generated text so far (stop string cut); needs the tokenizer."""
        entry = self._row(row)
        if entry.text is None:
            raise ConfigError("DecodeState was made without a tokenizer: pass tokenizer= to decode text")
        return entry.text.text

    def _row(self, row: int) -> _Row:
        if row not in self._rows:
            raise InputError(f"no row {row} in this decode state (it finished or was removed)")
        return self._rows[row]

    def add(self, prompts: Sequence[Sequence[int]], configs: Sequence[GenerationConfig] | GenerationConfig,
            tags: Sequence[Any] | None = None) -> list[int]:
        """Prefill ``prompts`` (token id lists) as new rows, each with its config and optional tag (what
        ``forward_context`` gets for the row); returns their row ids."""
        if isinstance(configs, GenerationConfig):
            configs = [configs] * len(prompts)
        if len(configs) != len(prompts):
            raise ConfigError(f"add() got {len(prompts)} prompts and {len(configs)} configs: pass one config each")
        if len(self) + len(prompts) > self.capacity:
            raise InputError(f"{len(self)} rows are live and {len(prompts)} more would pass the capacity of "
                             f"{self.capacity}: wait for rows to finish or make the state larger")
        configs = [c.resolved(self.model.config) for c in configs]
        fitted = []
        for prompt, config in zip(prompts, configs):
            fitted.append(fit_prompt(prompt, config.max_new_tokens, self.max_length, config.truncate_prompt))
            if config.num_beams > 1:
                raise ConfigError("DecodeState decodes greedy or sampled rows; beam search runs in generate()")
            if config.stop_strings and self.tokenizer is None:
                raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to DecodeState or generate()")
        pad = next((c.pad_token_id for c in configs if c.pad_token_id is not None), 0)
        ids, mask = left_pad(fitted, pad, self.device)
        if tags is not None and len(tags) != len(prompts):
            raise ConfigError(f"add() got {len(prompts)} prompts and {len(tags)} tags: pass one tag each")
        rows = self._new_ids(len(prompts))
        if tags is not None:
            self._tags.update(zip(rows, tags))
        newcomer = CausalSession(self.model, rows, self._context if self._user_context else None, self.dtype)
        with evaluating(self.model):
            logits = newcomer.prefill(ids, mask, 0 if len(self) else max(c.max_new_tokens for c in configs))
        self._join(newcomer, logits, configs, [len(p) for p in fitted], seen_ids=(ids, mask))
        return rows

    def _new_ids(self, n: int) -> list[int]:
        self._next_id += n
        return list(range(self._next_id - n, self._next_id))

    def _join(self, newcomer: Any, logits: Tensor, configs: Sequence[GenerationConfig], prompt_lengths: list[int],
              seen_ids: tuple[Tensor, Tensor | None]) -> None:
        """Make ``newcomer`` (a prefilled session, its first-token ``logits``) rows of this state."""
        self._vocab = logits.shape[-1]
        for rid, length, config in zip(newcomer.rows, prompt_lengths, configs):
            self._rows[rid] = _Row(
                config=config,
                generator=row_generator(config.seed, self.device) if config.sampling else None,
                eos=frozenset(config.eos_ids),
                limit=min(config.max_new_tokens, self.max_length - length),
                text=IncrementalText(self.tokenizer, config.stop_strings) if self.tokenizer is not None else None,
            )
        settings = RowSettings.of(configs, self.device)
        need_seen = settings.penalty is not None or self._seen is not None
        seen = seen_tokens(*seen_ids, self._vocab) if need_seen else None
        before = len(self)
        if not before:
            self.session = newcomer
            self._logits, self._settings, self._seen = logits, settings, seen
            return
        self.session.merge(newcomer, self._room())
        assert self._logits is not None and self._settings is not None
        self._logits = torch.cat([self._logits, logits])
        self._settings = RowSettings.cat([self._settings, settings], [before, len(configs)])
        if seen is not None:
            old = self._seen if self._seen is not None else torch.zeros(
                before, self._vocab, dtype=torch.bool, device=self.device)
            self._seen = torch.cat([old, seen])

    def remove(self, rows: Sequence[int]) -> None:
        """Drop ``rows`` now (a client went away); unknown ids are ignored."""
        gone = set(rows) & set(self.session.rows)
        for r in gone:
            self._rows.pop(r, None)
            self._tags.pop(r, None)
        if gone:
            self._keep([i for i, r in enumerate(self.session.rows) if r not in gone])

    def _room(self) -> int:
        """Free positions the cache needs: the most any live row may still generate."""
        return max((e.limit - len(e.tokens) for e in self._rows.values()), default=0)

    def _keep(self, indices: list[int]) -> None:
        if not indices:
            self.session = self._empty_session()
            self._logits = self._settings = self._seen = None
            return
        if len(indices) == len(self.session.rows):
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.session.keep(index)
        assert self._logits is not None and self._settings is not None
        self._logits = self._logits.index_select(0, index)
        self._settings = self._settings.select(index)
        if self._seen is not None:
            self._seen = self._seen.index_select(0, index)

    # --- decoding --------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Every live row's next token (one :class:`Event` each), then one forward for those still going."""
        if not len(self):
            return []
        assert self._logits is not None and self._settings is not None
        rows = self.session.rows
        scores = process(self._logits, self._settings, self._seen)
        chosen = choose(scores, self._settings, [self._rows[r].generator for r in rows])
        if self._seen is not None:
            mark_seen(self._seen, chosen)
        events, going = [], []
        for i, (rid, token) in enumerate(zip(rows, chosen.tolist())):
            entry = self._rows[rid]
            entry.tokens.append(token)
            finished = None
            if entry.text is not None:
                entry.text.push(token)
            if token in entry.eos or (entry.text is not None and entry.text.stopped):
                finished = "stop"
            elif len(entry.tokens) >= entry.limit:
                finished = "length"
            events.append(Event(rid, token, finished))
            if finished is None:
                going.append(i)
            else:
                del self._rows[rid]
                self._tags.pop(rid, None)
        self._keep(going)
        if going:
            with evaluating(self.model):
                self._ensure_room()
                self._logits = self.session.step(chosen.index_select(0, torch.tensor(going, device=chosen.device)))
        return events

    def _ensure_room(self) -> None:
        """The cache needs one free position for this step; rebuild it (dropping unused columns) if full."""
        if self.session.room() < 1:
            self.session.compact(max(1, self._room()))
