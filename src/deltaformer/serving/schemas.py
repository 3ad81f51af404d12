"""OpenAI's request and response JSON for ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Requests are checked strictly (types as JSON has them, ranges as OpenAI documents them): a field this server
does not know, or an OpenAI option it cannot honour (``n`` > 1, ``logprobs``, tools), is a 400 that names the
field, never silently ignored, because a client relying on it would get answers it did not ask for. Options
that change nothing about the answer (``user``, ``metadata``, ``store``) are accepted. Responses are built as
plain dicts in OpenAI's shapes, which the ``openai`` package parses into its own types.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ApiError

#: OpenAI options that would change the answer and that this server does not implement.
UNSUPPORTED = {
    "best_of": "generate one completion per request (best_of is not supported)",
    "echo": "prepend the prompt yourself (echo is not supported)",
    "suffix": "insertion (suffix) is not supported",
    "logprobs": "log-probabilities are not returned (logprobs is not supported)",
    "top_logprobs": "log-probabilities are not returned (top_logprobs is not supported)",
    "logit_bias": "logit_bias is not supported",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported (modalities)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported",
}

#: Fields accepted so OpenAI clients can send them, which do not change the answer.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "verbosity")


class StrictModel(BaseModel):
    """JSON types as sent (no "3" for 3), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Sampling(StrictModel):
    """Fields both generation endpoints share (OpenAI's names and ranges; top_k, min_p,
    repetition_penalty and ignore_eos are extensions as in vLLM: ignore_eos decodes past end-of-sequence
    tokens, so only max_tokens or a stop string ends the answer)."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    ignore_eos: bool | None = False
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=64)
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if stops is not None and any(len(s) > 256 for s in stops):
            raise ValueError("stop strings must be at most 256 characters")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(default="<|endoftext|>")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text or a list of token ids (OpenAI accepts both, and lists of either)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is an empty list: send a string or token ids", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        out = list(p)
        if any(isinstance(x, list) and not x for x in out):
            raise ApiError(400, "prompt holds an empty token list: every prompt needs a token", param="prompt")
        return out  # type: ignore[return-value]


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def parse_body(raw: bytes, kind: type[StrictModel]) -> Any:
    """A validated ``kind`` from the body bytes; malformed JSON and every bad field is a 400 naming it."""
    return _validate(_json_object(raw), kind)


def parse_request(raw: bytes, kind: type[_Sampling]) -> Any:
    """A validated generation request: :func:`parse_body` plus the OpenAI options this server cannot honour
    (each a 400 that says so, never silently ignored)."""
    data = _json_object(raw)
    for name, why in UNSUPPORTED.items():
        value = data.pop(name, None)
        if not _unset(value) and not (name == "best_of" and value == 1 and not isinstance(value, bool)):
            raise ApiError(400, f"{name}: {why}; drop the field", param=name, code="unsupported_parameter")
    request = _validate(data, kind)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise ApiError(400, f"{name} is not supported (use repetition_penalty): drop it or send 0",
                           param=name, code="unsupported_parameter")
    if (request.n or 1) > 1:
        raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n",
                       code="unsupported_parameter")
    return request


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}): send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body is a JSON {type(data).__name__}, not an object: send an object")
    return data


def _validate(data: dict[str, Any], kind: type[StrictModel]) -> Any:
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _unset(value: Any) -> bool:
    """What a client sends for an option it does not use: null, false, an empty list or object."""
    return value is None or value is False or (isinstance(value, list | dict) and not value)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "function-after"}


def _validation_error(exc: ValidationError) -> ApiError:
    """pydantic's first error as one line: ``messages.0.role: Input should be 'system', ...``."""
    error = exc.errors()[0]
    parts = [str(p) for p in error["loc"]
             if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("function-")))]
    where = ".".join(parts) or "body"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field: check its spelling, or drop it"
    elif error["type"] == "missing":
        message = "required field is missing"
    return ApiError(400, f"{where}: {message}", param=where or None)


# --- responses -----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    """A ``text_completion``: ``choices`` holds (text, finish_reason) per prompt."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_completion(rid: str, model: str, text: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(rid: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream asked with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, created: int, owner: str = "deltaformer", parent: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": owner}
    if parent is not None:
        card["parent"] = parent
    return card


class AddDelta(StrictModel):
    """Body of ``POST /v1/deltas``: load the delta files in ``path`` (inside a configured root) as ``name``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    path: str = Field(min_length=1, max_length=4096)
