"""The HTTP routes: OpenAI's ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON or
server-sent events), ``/health``, and ``/v1/deltas`` to add and remove deltas while serving.

Every answer that is not a success is OpenAI's error JSON with the matching status, whatever raised it
(a refused field, an unknown route, a failure inside the server), so clients see one shape. Bodies are read
here, counted against the size limit as they arrive, and parsed strictly (see ``schemas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError
from .schemas import (
    AddDelta,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    new_id,
    parse_body,
    parse_request,
    usage_chunk,
)
from .service import Job, Service

log = logging.getLogger("deltaformer.serving")

OPEN_ROUTES = frozenset({"/health"})


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over ``service``; starting and stopping it starts and stops the decode loop."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.scheduler.stop)

    settings = service.settings

    async def authenticate(request: Request) -> None:
        """Every route but /health needs the key when one is set (a dependency, not a middleware, so the
        routes still see the client's disconnect)."""
        if settings.api_key is None or request.url.path in OPEN_ROUTES:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            why = "no API key given" if not header else "the API key is wrong"
            raise ApiError(401, f"{why}: send 'Authorization: Bearer KEY' with the server's --api-key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="deltaformer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(authenticate)])
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}: see /v1/models, /v1/completions, "
                        "/v1/chat/completions", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        return _error(ApiError(500, f"internal error ({type(exc).__name__}); the server keeps running"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.registry.base, **service.scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.registry.cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for card in service.registry.cards():
            if card["id"] == model_id:
                return card
        service.registry.resolve(model_id)  # raises the 404 naming what is served
        raise AssertionError

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(await read_body(request, settings.max_body_bytes), CompletionRequest)
        prompts = await asyncio.to_thread(service.completion_prompts, body)
        job = service.job(body, prompts, asyncio.get_running_loop())
        service.submit(job)
        if body.stream:
            return _EventStream(_completion_stream(service, job, request, body), service, job)
        texts, reasons, tokens = await _collect(service, job, request)
        return JSONResponse(completion(new_id("cmpl"), job.model, list(zip(texts, reasons)), job.prompt_tokens,
                                       tokens))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = parse_request(await read_body(request, settings.max_body_bytes), ChatRequest)
        prompt = await asyncio.to_thread(service.chat_prompt, body)
        job = service.job(body, [prompt], asyncio.get_running_loop())
        service.submit(job)
        if body.stream:
            return _EventStream(_chat_stream(service, job, request, body), service, job)
        texts, reasons, tokens = await _collect(service, job, request)
        return JSONResponse(chat_completion(new_id("chatcmpl"), job.model, texts[0], reasons[0],
                                            job.prompt_tokens, tokens))

    @app.get("/v1/deltas")
    async def list_deltas() -> dict[str, Any]:
        _need_key(settings.api_key)
        return {"object": "list", "data": [
            {"id": service.registry.public_name(d.name), "name": d.name, "method": d.method, "path": d.path}
            for d in service.registry.deltas.values()]}

    @app.post("/v1/deltas", status_code=201)
    async def add_delta(request: Request) -> dict[str, Any]:
        _need_key(settings.api_key)
        body = parse_body(await read_body(request, settings.max_body_bytes), AddDelta)
        loaded = await service.scheduler.call(lambda: service.registry.add(body.name, body.path))
        return {"id": service.registry.public_name(loaded.name), "object": "model", "method": loaded.method}

    @app.delete("/v1/deltas/{name}")
    async def remove_delta(name: str) -> dict[str, Any]:
        _need_key(settings.api_key)

        def remove() -> None:
            busy = service.scheduler.users(name)
            if busy:
                raise ApiError(409, f"delta {name!r} is in use by {busy} sequence(s): remove it when they finish",
                               code="delta_in_use")
            service.registry.remove(name)

        await service.scheduler.call(remove)
        return {"id": service.registry.public_name(name), "object": "model", "deleted": True}

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(400, f"Content-Length {declared!r} is not a number", code="invalid_content_length")
    if declared is not None and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes: send less", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes: send less", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _need_key(api_key: str | None) -> None:
    if api_key is None:
        raise ApiError(403, "managing deltas needs an authenticated server: start it with --api-key",
                       code="api_key_required")


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _collect(service: Service, job: Job, request: Request) -> tuple[list[str], list[str], int]:
    texts = [""] * len(job.sequences)
    reasons = ["stop"] * len(job.sequences)
    tokens = 0
    async for event in service.events(job, request.is_disconnected):
        texts[event.index] += event.text
        if event.reason is not None:
            reasons[event.index] = event.reason
            tokens += event.completion_tokens
    return texts, reasons, tokens


class _EventStream(StreamingResponse):
    """Server-sent events that take the job's sequences out of the batch however the response ends: done,
    the client gone (starlette cancels the stream), a failed send, or the server stopping."""

    def __init__(self, chunks: AsyncGenerator[dict[str, Any], None], service: Service, job: Job) -> None:
        self.chunks, self.service, self.job = chunks, service, job
        super().__init__(self._lines(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _lines(self) -> AsyncIterator[str]:
        try:
            async for chunk in self.chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as exc:  # the stream has begun: the status is sent, so the error goes in the stream
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        yield "data: [DONE]\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.service.scheduler.cancel(self.job.sequences)  # no-op for sequences that ended
            with contextlib.suppress(Exception):
                await self.chunks.aclose()


async def _completion_stream(service: Service, job: Job, request: Request,
                             body: CompletionRequest) -> AsyncGenerator[dict[str, Any], None]:
    rid, tokens = new_id("cmpl"), 0
    async for event in service.events(job, request.is_disconnected):
        if event.text or event.reason is not None:
            yield completion_chunk(rid, job.model, event.index, event.text, event.reason)
        tokens += event.completion_tokens
    if body.stream_options is not None and body.stream_options.include_usage:
        yield usage_chunk(rid, job.model, "text_completion", job.prompt_tokens, tokens)


async def _chat_stream(service: Service, job: Job, request: Request,
                       body: ChatRequest) -> AsyncGenerator[dict[str, Any], None]:
    rid, tokens = new_id("chatcmpl"), 0
    yield chat_chunk(rid, job.model, {"role": "assistant", "content": ""}, None)
    async for event in service.events(job, request.is_disconnected):
        if event.text:
            yield chat_chunk(rid, job.model, {"content": event.text}, None)
        if event.reason is not None:
            yield chat_chunk(rid, job.model, {}, event.reason)
        tokens += event.completion_tokens
    if body.stream_options is not None and body.stream_options.include_usage:
        yield usage_chunk(rid, job.model, "chat.completion.chunk", job.prompt_tokens, tokens)
