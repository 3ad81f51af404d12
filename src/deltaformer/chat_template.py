"""Chat templates: the Jinja programs models ship to lay out a conversation, rendered as ``transformers`` does.

A template comes from a model file (GGUF metadata, ``tokenizer_config.json``), so it is untrusted code: it runs
in Jinja's immutable sandbox, with the same environment Hugging Face builds (``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` that does not escape HTML, ``raise_exception``, ``strftime_now``) and the same
variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens), so the text
is the one the model was tuned on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .errors import InputError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(InputError):
    """A chat template does not compile, or refuses the messages it was given."""


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """The compiled template (cached: a server renders the same one for every request)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile ({_one_line(exc)}): fix it or pass another "
                                "with chat_template=") from None


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           continue_final_message: bool = False, tools: list[dict] | None = None,
           documents: list[dict] | None = None, **variables: Any) -> str:
    """The text of one conversation; ``variables`` (special tokens, template options) reach the template.

    ``continue_final_message`` leaves the last message open (no end-of-turn after it), for prefilling a reply.
    """
    from jinja2 import TemplateError

    chat = [dict(m) for m in messages]
    for message in chat:
        if "role" not in message:
            raise ChatTemplateError(f"chat message {message!r} has no 'role': write {{'role': ..., 'content': ...}}")
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message needs a last message with text content")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    try:
        text = compile_template(template).render(messages=chat, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused these messages: {_one_line(exc)}") from None
    if continue_final_message:
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0 or final.strip() not in text:
            raise ChatTemplateError("continue_final_message: the chat template does not show the final message as "
                                    "written, so it cannot be continued")
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
