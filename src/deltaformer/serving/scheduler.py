"""Continuous batching: one decode loop on its own thread, sequences joining and leaving at token boundaries.

Every sequence (one choice of one request) carries its own delta, sampling settings, stop strings and token
limit. Between two decode steps the loop (1) runs queued changes to the model (adding or removing a delta),
(2) drops sequences whose client went away, (3) prefills waiting sequences into free slots, and (4) runs one
step for the whole batch. Each forward runs under ``delta.route`` with one delta name per row, so rows of
different deltas, of any method, share one batched forward. Sampling, end tokens, token limits and the KV
cache belong to ``generation.DecodeState``; each sequence's ``IncrementalText`` decodes its tokens once, for
the streamed text and its stop strings (a row that hits one leaves the batch, as in ``generate``). This
module only decides who is in the batch and passes tokens on.

The HTTP side lives on an asyncio loop; tokens cross over with ``loop.call_soon_threadsafe`` into each
request's queue, so a slow client never holds up the decode loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import delta
from ..errors import DeltaformerError
from ..generation import DecodeState, GenerationConfig, IncrementalText
from .errors import ApiError
from .registry import DeltaRegistry
from .settings import ServeConfig

log = logging.getLogger("deltaformer.serving")


@dataclass
class Event:
    """What a sequence reports to its request: a text piece, or the end (``reason`` set)."""

    index: int
    text: str = ""
    reason: str | None = None
    completion_tokens: int = 0
    error: ApiError | None = None


@dataclass(eq=False)  # compared by identity: two requests may ask the very same thing
class Sequence:
    """One sequence in flight: what to decode, where its tokens go, how far it has come."""

    index: int
    prompt: list[int]
    config: GenerationConfig
    delta: str | None
    stops: list[str]
    deliver: Callable[[Event], None]
    stream: IncrementalText | None = None
    row: int | None = None
    tokens: int = 0
    cancelled: bool = False
    done: bool = False


class Scheduler:
    """Owns the model while serving: only this thread runs forwards or changes deltas."""

    def __init__(self, model: nn.Module, tokenizer: Any, registry: DeltaRegistry, settings: ServeConfig,
                 max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.settings = settings
        self.max_length = max_length
        self.waiting: deque[Sequence] = deque()
        self.live: dict[int, Sequence] = {}
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.lock = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.generated = 0
        self.joining: list[Sequence] = []  # being prefilled: not yet in ``live``, their row ids not yet known
        # no tokenizer: each sequence's IncrementalText (streamed text and stop strings) decodes its tokens
        # once, here, instead of DecodeState decoding them a second time for its own stop check
        self.state = DecodeState(model, capacity=settings.max_batch, max_length=max_length,
                                 forward_context=self._route)
        self.thread = threading.Thread(target=self._loop, name="deltaformer-decode", daemon=True)

    # --- the HTTP side ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all of one request, or none of them: 429 when the queue is full)."""
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down")
            if len(sequences) > self.settings.max_batch + self.settings.max_queue:
                raise ApiError(400, f"{len(sequences)} prompts are more than the server holds at once "
                               f"({self.settings.max_batch + self.settings.max_queue}): send fewer", param="prompt")
            busy = len(self.waiting) + len(self.live)
            room = self.settings.max_batch + self.settings.max_queue - busy
            if len(sequences) > room:
                raise ApiError(429, f"the server is busy ({len(self.live)} decoding, {len(self.waiting)} waiting): "
                               "retry later", code="queue_full", headers={"Retry-After": "1"})
            for seq in sequences:
                seq.stream = IncrementalText(self.tokenizer, seq.stops)
                self.waiting.append(seq)
            self.lock.notify_all()

    def cancel(self, sequences: list[Sequence]) -> None:
        """The client went away: waiting sequences give up their queue places now, decoding ones leave the
        batch at the next token boundary (safe to call for sequences that already ended)."""
        with self.lock:
            for seq in sequences:
                seq.cancelled = True
            if any(seq.row is None for seq in sequences):
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            self.lock.notify_all()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the decode thread between two steps (changes to the model's deltas)."""
        future: Future = Future()
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down")
            self.calls.append((fn, future))
            self.lock.notify_all()
        return await asyncio.wrap_future(future)

    def users(self, name: str) -> int:
        """Sequences waiting or decoding with delta ``name`` (call on the decode thread)."""
        with self.lock:
            return sum(1 for s in [*self.waiting, *self.live.values()] if s.delta == name and not s.done)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"decoding": len(self.live), "waiting": len(self.waiting), "steps": self.steps,
                    "generated_tokens": self.generated, "max_batch": self.settings.max_batch}

    # --- the decode thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.stopping or self.calls or self.waiting or self.live):
                    self.lock.wait()
                if self.stopping:
                    break
                calls, self.calls = self.calls, []
                gone = [s for s in self.live.values() if s.cancelled]
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            try:
                self._run_calls(calls)
                self._drop(gone)
                self._admit()
                if self.live:
                    self._step()
            except Exception as exc:  # a failure inside a forward: fail the batch, keep the server
                log.exception("decode step failed")
                self._fail_all(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}"))
        self._fail_all(ApiError(503, "the server is shutting down"), waiting=True)

    def _run_calls(self, calls: list[tuple[Callable[[], Any], Future]]) -> None:
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _drop(self, gone: list[Sequence]) -> None:
        rows = [s.row for s in gone if s.row is not None and s.row in self.live]
        if rows:
            self.state.remove(rows)
        with self.lock:
            for s in gone:
                self.live.pop(s.row, None)  # type: ignore[arg-type]
                s.done = True

    def _admit(self, most: int | None = None) -> None:
        """Prefill as many waiting sequences as there are free slots (or ``most``), in one batched forward.
        If that fails, they are retried one at a time, so only the sequence that cannot run fails."""
        with self.lock:
            free = self.settings.max_batch - len(self.live)
            batch = [self.waiting.popleft() for _ in range(min(free, most or free, len(self.waiting)))]
        for seq in [s for s in batch if s.delta is not None and s.delta not in self.registry.deltas]:
            batch.remove(seq)  # removed after the request named it: that request alone fails
            self._finish(seq, "error", ApiError(404, f"delta {seq.delta!r} was removed: ask for another model",
                                                param="model", code="model_not_found"))
        if not batch:
            return
        self.joining = batch
        try:
            rows = self.state.add([s.prompt for s in batch], [s.config.replace(stop_strings=None) for s in batch])
        except Exception as exc:
            self.joining = []
            if len(batch) > 1:
                with self.lock:
                    self.waiting.extendleft(reversed(batch))
                for _ in batch:
                    self._admit(most=1)
                return
            status = 400 if isinstance(exc, DeltaformerError) else 500
            if status == 500:
                log.exception("prefill failed")
            self._finish(batch[0], "error", ApiError(status, f"cannot start this sequence: {exc}"))
            return
        finally:
            self.joining = []
        with self.lock:
            for seq, row in zip(batch, rows):
                seq.row = row
                self.live[row] = seq

    def _step(self) -> None:
        events = self.state.step()
        self.steps += 1
        stopped = []
        for event in events:
            seq = self.live.get(event.row)
            if seq is None or seq.done:
                continue
            seq.tokens += 1
            self.generated += 1
            stream = seq.stream
            assert stream is not None  # set by submit()
            piece = stream.push(event.token)
            if piece:
                seq.deliver(Event(seq.index, text=piece))
            if event.finished is not None:
                self._finish(seq, event.finished)
            elif stream.stopped:  # a stop string: the row leaves the batch here, as DecodeState would drop it
                stopped.append(event.row)
                self._finish(seq, "stop")
        if stopped:
            self.state.remove(stopped)

    def _finish(self, seq: Sequence, reason: str, error: ApiError | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        with self.lock:
            if seq.row is not None:
                self.live.pop(seq.row, None)
        if error is None:
            tail = seq.stream.flush() if seq.stream is not None else ""
            if tail:
                seq.deliver(Event(seq.index, text=tail))
        seq.deliver(Event(seq.index, reason=reason, completion_tokens=seq.tokens, error=error))

    def _fail_all(self, error: ApiError, waiting: bool = False) -> None:
        with contextlib.suppress(Exception):
            self.state.remove(list(self.live))
        for seq in list(self.live.values()):
            self._finish(seq, "error", error)
        if waiting:
            with self.lock:
                rest, self.waiting = list(self.waiting), deque()
            for seq in rest:
                self._finish(seq, "error", error)

    @contextlib.contextmanager
    def _route(self, rows: list[int]) -> Iterator[None]:
        """Each row of the next forward gets its sequence's delta (None = the bare model). A prefill's rows
        are the joining sequences, in the order they were added."""
        if not delta.deltas(self.model):
            yield
            return
        joining = iter(self.joining)
        names = [self.live[r].delta if r in self.live else next(joining).delta for r in rows]
        with delta.route(self.model, names):
            yield
