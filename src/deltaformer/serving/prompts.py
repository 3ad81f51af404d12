"""Requests to token ids: completion prompts as text or ids, chat messages through the chat template.

Token ids are checked against the vocabulary here, so an out-of-range id is the client's 400 rather than an
index error inside the batched forward that would fail every row with it.
"""

from __future__ import annotations

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
    """Ids of a chat prompt ending with the assistant's turn opened (``add_generation_prompt``), rendered by
    the tokenizer's ``apply_chat_template`` (Jinja's sandbox; the model file's template is untrusted)."""
    from ..chat_template import ChatTemplateError

    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ApiError(400, "this model has no chat template, so /v1/chat/completions cannot format messages: "
                       "use /v1/completions, or start the server with --chat-template FILE",
                       code="no_chat_template")
    try:
        ids = list(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True))
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), param="messages", code="chat_template_error") from None
    if not ids:
        raise ApiError(400, "the chat template made an empty prompt from these messages", param="messages")
    return ids
