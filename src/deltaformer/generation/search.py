"""``generate``: greedy, sampled or beam search for every model with a decoder, and ``stream_text``.

Greedy and sampled search run through :class:`~deltaformer.generation.state.DecodeState` (rows that end drop
out of the batch); beam search is Hugging Face's vectorised algorithm step for step, so ties break alike and
the ids equal ``transformers``' ``generate``. Output is HF's: for a decoder-only model the (left-padded)
prompt followed by the new tokens; for an encoder-decoder the decoder's start token followed by them; rows
that ended early are filled with ``pad_token_id``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .config import GenerationConfig
from .processors import RowSettings, process, seen_tokens
from .sessions import (
    ForwardContext,
    Seq2SeqSession,
    context_window,
    evaluating,
    is_encoder_decoder,
    left_pad,
    new_session,
)
from .state import DecodeState, Event, fit_prompt
from .text import IncrementalText

if TYPE_CHECKING:
    from ..models.led import LEDForConditionalGeneration

RowsCallback = Callable[[Tensor], None]


def routed(model: nn.Module, names: Sequence[str | None]) -> ForwardContext:
    """A ``forward_context`` giving batch row ``r`` (original prompt ``r``) delta ``names[r]`` (None: bare)."""
    from ..delta.api import route

    names = list(names)
    return lambda rows: route(model, [names[r] for r in rows])


def _contexts(model: nn.Module, deltas: Sequence[str | None] | None, forward_context: ForwardContext | None,
              on_rows: RowsCallback | None) -> ForwardContext | None:
    """One forward context from per-prompt ``deltas``, a user ``forward_context`` and ``on_rows``."""
    parts = [c for c in (routed(model, deltas) if deltas is not None else None, forward_context) if c is not None]
    if on_rows is None and len(parts) <= 1:
        return parts[0] if parts else None
    last: list[list[int]] = [[]]

    @contextlib.contextmanager
    def context(rows: list[int]) -> Iterator[None]:
        if on_rows is not None and last[0] and rows != last[0]:
            previous: dict[int, int] = {}
            for i, r in enumerate(last[0]):
                previous.setdefault(r, i)
            on_rows(torch.tensor([previous[r] for r in rows], dtype=torch.long))
        last[0] = list(rows)
        with contextlib.ExitStack() as stack:
            for part in parts:
                stack.enter_context(part(rows))
            yield
    return context


def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
             config: GenerationConfig | None = None, tokenizer: Any = None, on_rows: RowsCallback | None = None,
             *, deltas: Sequence[str | None] | None = None, forward_context: ForwardContext | None = None,
             global_attention_mask: Tensor | None = None, **settings: Any) -> Tensor:
    """Continue ``input_ids`` (B, S; left-padded under ``attention_mask`` for a decoder-only model).

    ``config`` / ``settings``: a :class:`GenerationConfig` and overrides of its fields. ``deltas``: one delta
    name (or None) per prompt; each prompt is decoded with its own delta, in one batch. ``forward_context``:
    ``rows -> context manager`` entered around every forward (``rows``: each batch row's prompt index).
    ``on_rows(index)``: called when rows are reordered or dropped, with the kept rows as indices into the
    previous batch. Returns (B, prompt + new) ids as HF does (see the module docstring).
    """
    config = GenerationConfig.create(config, **settings).resolved(model.config)
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    if deltas is not None and len(deltas) != input_ids.shape[0]:
        raise ConfigError(f"deltas names {len(deltas)} prompts but the batch has {input_ids.shape[0]}: "
                          "give one name (or None) per prompt")
    if config.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer: pass tokenizer= to generate()")
    context = _contexts(model, deltas, forward_context, on_rows)
    with evaluating(model):
        if is_encoder_decoder(model):
            return _generate_seq2seq(model, input_ids, attention_mask, global_attention_mask, config, tokenizer,
                                     context)
        return _generate_causal(model, input_ids, attention_mask, config, tokenizer, context)


def _prompts(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return input_ids.tolist()
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]


def _generate_causal(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                     config: GenerationConfig, tokenizer: Any, context: ForwardContext | None) -> Tensor:
    window = context_window(model)
    prompts = [fit_prompt(p, config.max_new_tokens, window, config.truncate_prompt)
               for p in _prompts(input_ids, attention_mask)]
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if any(len(p) != len(q) for p, q in zip(prompts, _prompts(input_ids, attention_mask))):
        input_ids, attention_mask = left_pad(prompts, pad, input_ids.device)
    elif attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if config.num_beams > 1:
        session = new_session(model, list(range(input_ids.shape[0])), context)
        room = config.max_new_tokens
        if window is not None:
            room = min(room, window - input_ids.shape[1])
        logits = session.prefill(input_ids, attention_mask, room, repeat=config.num_beams)
        return beam_search(session, logits, input_ids, attention_mask, config, room)
    max_length = input_ids.shape[1] + config.max_new_tokens
    if window is not None:
        max_length = min(max_length, window)
    state = DecodeState(model, input_ids.shape[0], max_length, tokenizer, context, input_ids.device)
    session = new_session(model, state._new_ids(input_ids.shape[0]), context)
    logits = session.prefill(input_ids, attention_mask, max_length - input_ids.shape[1])
    state._join(session, logits, [config] * input_ids.shape[0], [input_ids.shape[1]] * input_ids.shape[0],
                seen_ids=(input_ids, attention_mask))
    return torch.cat([input_ids, _run(state, input_ids.shape[0], pad)], dim=1)


def _generate_seq2seq(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                      global_attention_mask: Tensor | None, config: GenerationConfig, tokenizer: Any,
                      context: ForwardContext | None) -> Tensor:
    batch = input_ids.shape[0]
    led_config = cast("LEDForConditionalGeneration", model).config  # the encoder-decoder generate() detected
    start = led_config.decoder_start_token_id
    room = min(config.max_new_tokens, led_config.max_decoder_position_embeddings - 1)
    session = Seq2SeqSession(model, list(range(batch)), context, global_attention_mask)
    if config.num_beams > 1:
        logits = session.prefill(input_ids, attention_mask, room, repeat=config.num_beams)
        starts = input_ids.new_full((batch, 1), start)
        return beam_search(session, logits, starts, None, config, room)
    state = DecodeState(model, batch, 1 + room, tokenizer, context, input_ids.device)
    session.rows = state._new_ids(batch)
    logits = session.prefill(input_ids, attention_mask, room)
    starts = input_ids.new_full((batch, 1), start)
    state._join(session, logits, [config] * batch, [1] * batch, seen_ids=(starts, None))
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return torch.cat([starts, _run(state, batch, pad)], dim=1)


def _run(state: DecodeState, batch: int, pad: int) -> Tensor:
    """Step ``state`` (rows 0..batch-1) until every row ends; (batch, longest) new ids, ``pad``-filled."""
    generated: list[list[int]] = [[] for _ in range(batch)]
    while len(state):
        for event in state.step():
            generated[event.row].append(event.token)
    width = max(len(g) for g in generated)
    return torch.tensor([g + [pad] * (width - len(g)) for g in generated], dtype=torch.long,
                        device=state.device).view(batch, width)


def beam_search(session: Any, logits: Tensor, prompt: Tensor, prompt_mask: Tensor | None,
                config: GenerationConfig, room: int) -> Tensor:
    """Hugging Face's vectorised beam search, step for step, so ties break alike.

    ``logits``: the first next-token logits of the ``num_beams`` copies of each prompt (the session is
    prefilled with them). Each step keeps the best ``max(2, 1 + n_eos) * beams`` continuations; those ending
    (an eos or the length limit) among the first ``beams`` become finished hypotheses scored
    ``sum log p / generated ** length_penalty``; the best ``beams`` others run on. It stops when no running beam
    can beat the worst kept hypothesis (judged at the current length, or at the longest for
    ``early_stopping="never"`` with a positive penalty), or, with ``early_stopping=True``, as soon as every row
    holds ``beams`` finished hypotheses. Returns (batch, prompt + generated) ids.
    """
    beams, length_penalty, early_stopping = config.num_beams, config.length_penalty, config.early_stopping
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=logits.device)
    batch, prompt_len = prompt.shape
    device = logits.device
    stop_when_full = early_stopping is True
    judge_at_longest = early_stopping == "never" and length_penalty > 0.0
    top = max(2, 1 + len(config.eos_ids)) * beams
    length = prompt_len + room
    big = -1.0e9
    fill = config.pad_token_id or (config.eos_ids[0] if config.eos_ids else -1)
    top_mask = torch.arange(top, device=device) < beams
    offset = torch.arange(batch, device=device)[:, None] * beams
    running = torch.full((batch, beams, length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt[:, None, :]
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = big
    finished_scores = torch.full((batch, beams), big, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    running_from = torch.full((batch, beams, room), -1, dtype=torch.long, device=device)
    finished_from = running_from.clone()
    settings = RowSettings.of([config] * (batch * beams), device)
    flat_prompt = prompt.repeat_interleave(beams, dim=0)
    flat_mask = None if prompt_mask is None else prompt_mask.repeat_interleave(beams, dim=0)
    penalised = settings.penalty is not None
    cur = prompt_len

    def take(x: Tensor, index: Tensor) -> Tensor:
        return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)

    while True:
        log_probs = F.log_softmax(logits, dim=-1)
        if penalised:
            seen_ids = torch.cat([flat_prompt, running[:, :, prompt_len:cur].reshape(batch * beams, -1)], 1)
            seen_mask = None if flat_mask is None else F.pad(flat_mask, (0, cur - prompt_len), value=1)
            log_probs = process(log_probs, settings, seen_tokens(seen_ids, seen_mask, log_probs.shape[-1]))
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        top_scores, top_index = torch.topk(log_probs, k=top)
        source = top_index // vocab
        candidates, candidates_from = take(running, source), take(running_from, source)
        candidates[:, :, cur] = top_index % vocab
        candidates_from[:, :, cur - prompt_len] = source + offset
        ends = torch.isin(candidates[:, :, cur], eos) | (cur + 1 >= length)
        # beams that go on: the best that did not end
        go_on = top_scores + ends.float() * big
        keep = torch.topk(go_on, k=beams)[1]
        running, running_scores, running_from = take(candidates, keep), take(go_on, keep), take(candidates_from, keep)
        # hypotheses that ended among the first `beams` join the finished ones if better
        scores = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
        if stop_when_full:  # a row with `beams` finished hypotheses takes no more
            scores = scores + is_finished.all(dim=1, keepdim=True).float() * big
        scores = scores + (~improvable).float() * big
        just_ended = ends & top_mask[None, :]
        scores = scores + (~just_ended) * big
        best = torch.topk(torch.cat([finished_scores, scores], dim=1), k=beams)[1]
        finished = take(torch.cat([finished, candidates], dim=1), best)
        finished_scores = take(torch.cat([finished_scores, scores], dim=1), best)
        finished_from = take(torch.cat([finished_from, candidates_from], dim=1), best)
        is_finished = take(torch.cat([is_finished, just_ended], dim=1), best)
        parents = running_from[:, :, cur - prompt_len].reshape(-1)
        cur += 1
        best_running = running_scores[:, :1] / (((length if judge_at_longest else cur) - prompt_len) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], big)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = stop_when_full and bool(is_finished.all())
        if not improvable.any() or all_full or ends.all():
            break
        session.keep(parents)
        logits = session.step(running[:, :, cur - 1].reshape(-1))
    generated = int((finished_from[:, 0] + 1).bool().sum(dim=1).max())
    return finished[:, 0, :prompt_len + generated]


def stream_text(model: nn.Module, tokenizer: Any, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                *, delta: str | None = None, forward_context: ForwardContext | None = None,
                **settings: Any) -> Iterator[str]:
    """Generate from one ``prompt`` (text, or token ids) and yield the text as it grows, piece by piece.

    Pieces never split a UTF-8 character and never show a stop string (generation ends there). ``delta``:
    the one delta to decode with (None: whatever is active).
    """
    config = GenerationConfig.create(config, **settings)
    if config.num_beams > 1:
        raise ConfigError("streaming decodes one token at a time: use num_beams=1 (beam search cannot stream)")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    context = routed(model, [delta]) if delta is not None else forward_context
    window = context_window(model)
    config = config.resolved(model.config)
    ids = fit_prompt(ids, config.max_new_tokens, window, config.truncate_prompt)
    max_length = len(ids) + config.max_new_tokens if window is None else min(window, len(ids) + config.max_new_tokens)
    state = DecodeState(model, 1, max_length, tokenizer, context)
    text = IncrementalText(tokenizer, config.stop_strings)
    state.add([ids], config)
    while len(state):
        events: list[Event] = state.step()
        for event in events:
            piece = text.push(event.token)
            if piece:
                yield piece
    rest = text.flush()
    if rest:
        yield rest
