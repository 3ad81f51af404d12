"""Between HTTP and the decode loop: a validated request becomes sequences, and their events an answer.

Everything that can be wrong with a request is found here, before it reaches the batch (unknown model,
prompt too long, ``max_tokens`` too large, token ids outside the vocabulary), so a bad request is refused
alone and never disturbs the sequences already decoding.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from ..errors import ConfigError
from ..generation import GenerationConfig
from ..models.base import PreTrainedModel
from .errors import ApiError
from .prompts import chat_ids, encode_prompt
from .registry import DeltaRegistry
from .scheduler import Event, Scheduler, Sequence
from .schemas import ChatRequest, CompletionRequest
from .settings import ServeConfig

#: How often a waiting request asks whether its client is still connected (seconds).
DISCONNECT_CHECK_S = 0.25


@dataclass
class Job:
    """One request's sequences and the queue their events arrive on."""

    model: str
    sequences: list[Sequence]
    queue: asyncio.Queue
    prompt_tokens: int


class Service:
    """The served model, its deltas and the decode loop, as the HTTP routes use them."""

    def __init__(self, model: nn.Module, tokenizer: Any, settings: ServeConfig, base_name: str,
                 chat_template: str | None = None, max_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.chat_template = chat_template
        self.registry = DeltaRegistry(model, base_name, settings.delta_roots)
        config = cast(PreTrainedModel, model).config  # the served model is a loaded checkpoint
        context = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        self.vocab_size = int(config.vocab_size)
        self.max_length = min(context, max_length or context)
        limit = self.max_length - settings.max_tokens_limit
        self.max_prompt = min(settings.max_prompt_tokens or limit, limit)
        if self.max_prompt < 1:
            raise ConfigError(f"max_tokens_limit {settings.max_tokens_limit} leaves no room for a prompt in "
                              f"{self.max_length} positions: lower --max-tokens-limit")
        self.eos = _eos_ids(model, tokenizer)
        self.pad = getattr(config, "pad_token_id", None)
        self.scheduler = Scheduler(model, tokenizer, self.registry, settings, self.max_length)
        self.seeds = random.Random()

    # --- requests to sequences -------------------------------------------------------------------------

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, p, self.vocab_size) for p in request.prompts()]

    def chat_prompt(self, request: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in request.messages]
        return chat_ids(self.tokenizer, self.chat_template, messages)

    def job(self, request: CompletionRequest | ChatRequest, prompts: list[list[int]],
            loop: asyncio.AbstractEventLoop) -> Job:
        name = self.registry.resolve(request.model)
        max_tokens = request.max_tokens
        if isinstance(request, ChatRequest):
            max_tokens = request.max_completion_tokens or max_tokens
        default = (min(self.settings.default_max_tokens, self.settings.max_tokens_limit)
                   if isinstance(request, CompletionRequest) else None)
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of "
                           f"{self.settings.max_tokens_limit}: ask for fewer", param="max_tokens",
                           code="max_tokens_exceeded")
        stops = request.stop or []
        assert not isinstance(stops, str)  # the request validator turns one stop string into a list
        if len(stops) > self.settings.max_stop_strings:
            raise ApiError(400, f"{len(stops)} stop strings: at most {self.settings.max_stop_strings}",
                           param="stop")
        extra = self.registry.extra_tokens(name)
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the request's event loop has closed: nobody is listening any more
                pass

        sequences = []
        for index, ids in enumerate(prompts):
            if len(ids) > self.max_prompt:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                               f"{self.max_prompt}: shorten it", param="prompt" if default else "messages",
                               code="context_length_exceeded")
            room = self.max_length - len(ids) - extra
            new = max_tokens if max_tokens is not None else min(default or self.settings.max_tokens_limit, room)
            if new > room:
                raise ApiError(400, f"the prompt ({len(ids)} tokens{f' + {extra} soft tokens' if extra else ''}) "
                               f"plus max_tokens {new} exceeds the context of {self.max_length}: ask for fewer "
                               "tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
            sequences.append(Sequence(index=index, prompt=ids, config=self._config(request, new), delta=name,
                                      stops=stops, deliver=deliver))
        return Job(self.registry.public_name(name), sequences, queue, sum(len(p) for p in prompts))

    def _config(self, request: CompletionRequest | ChatRequest, max_new_tokens: int) -> GenerationConfig:
        temperature = 1.0 if request.temperature is None else request.temperature
        # OpenAI's seed is any integer; a row generator takes 0..2**63-1 (the same seed, the same tokens)
        seed = request.seed % 2**63 if request.seed is not None else self.seeds.getrandbits(63)
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=request.top_k or 0,
            top_p=1.0 if request.top_p is None else request.top_p,
            min_p=request.min_p or None,
            repetition_penalty=request.repetition_penalty or 1.0,
            eos_token_id=[] if request.ignore_eos else self.eos,  # [] = no end token (None = the model's)
            pad_token_id=self.pad if self.pad is not None or not self.eos else self.eos[0],
            stop_strings=list(request.stop or []) or None,
            seed=seed,
        )

    # --- events to answers -----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue the job's sequences (429 when the queue is full); before any answer is sent, so the
        status can still say so."""
        self.scheduler.submit(job.sequences)

    async def events(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[Event]:
        """The submitted job's events until every sequence has ended; leaving early (the client went away,
        the caller stopped iterating) takes the sequences out of the batch."""
        open_ = len(job.sequences)
        checked = time.monotonic()
        try:
            while open_:
                try:
                    event = await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_CHECK_S)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_CHECK_S:  # tokens may flow without pause
                    checked = time.monotonic()
                    if await disconnected():
                        return
                if event is None:
                    continue
                if event.error is not None:
                    raise event.error
                if event.reason is not None:
                    open_ -= 1
                yield event
        finally:
            if open_:
                self.scheduler.cancel(job.sequences)


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int] | None:
    """End-of-sequence ids from the model config (int or list), else the tokenizer's."""
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = (getattr(model.config, "extra", None) or {}).get("eos_token_id")
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return None
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]
