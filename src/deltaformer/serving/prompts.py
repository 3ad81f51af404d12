"""Requests to token ids: completion prompts as text or ids, chat messages through the model's chat template.

Chat templates are Jinja programs shipped inside model files, so they are rendered in Jinja's immutable
sandbox (no attribute access to Python internals, no file or module access), with the variables Hugging
Face's ``apply_chat_template`` passes (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``), and the result is tokenized without adding special tokens again, as HF
does, because the template writes them itself.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import ApiError


def encode_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Ids of a completion prompt (text is tokenized with the tokenizer's own special tokens)."""
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens: send some text", param="prompt")
        return ids
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
    return list(prompt)


def chat_ids(tokenizer: Any, template: str | None, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a chat prompt ending with the assistant's turn opened (``add_generation_prompt``)."""
    if not template:
        raise ApiError(400, "this model has no chat template, so /v1/chat/completions cannot format messages: "
                       "use /v1/completions, or start the server with --chat-template FILE",
                       code="no_chat_template")
    text = render_chat(template, messages, bos_token=_special(tokenizer, "bos"), eos_token=_special(tokenizer, "eos"))
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ApiError(400, "the chat template made an empty prompt from these messages", param="messages")
    return ids


def render_chat(template: str, messages: list[dict[str, str]], **variables: Any) -> str:
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True, **variables)
    except ApiError:
        raise
    except TemplateError as exc:
        raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages",
                       code="chat_template_error") from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ApiError(500, f"the model's chat template does not compile ({exc}): pass --chat-template FILE",
                       code="chat_template_error") from None


def _raise(message: str) -> None:
    raise ApiError(400, f"the chat template refused these messages: {message}", param="messages",
                   code="chat_template_error")


def _special(tokenizer: Any, kind: str) -> str:
    return getattr(tokenizer, f"{kind}_token", None) or ""
