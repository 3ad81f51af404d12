"""Chat templates: the Jinja program a model ships (in ``tokenizer_config.json`` or GGUF metadata) rendered as
``transformers``' ``apply_chat_template`` renders it.

The template runs in Jinja's immutable sandbox (no access to Python internals, files or modules) with what
Hugging Face gives it: ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...), ``raise_exception``, ``strftime_now``, a ``tojson`` filter
that does not escape HTML, ``trim_blocks`` and ``lstrip_blocks``, and loop controls. A template that refuses
the messages (``raise_exception``) or fails to render is one :class:`ChatTemplateError` line.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .errors import DeltaformerError

Message = Mapping[str, Any]


class ChatTemplateError(DeltaformerError, ValueError):
    """A chat template does not compile, or refuses (or fails on) the messages given."""


def render_chat_template(template: str, messages: Sequence[Message], add_generation_prompt: bool = False,
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         documents: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """The text of ``messages`` in ``template``; ``variables`` are the special tokens and any template extras."""
    from jinja2 import TemplateError

    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatTemplateError(f"chat message {i} is {message!r}: each message is a dict with a 'role' "
                                    "and a 'content'")
    try:
        return _compiled(template).render(messages=[dict(m) for m in messages], tools=tools, documents=documents,
                                          add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused these messages: {exc}") from None
    except Exception as exc:  # a template is a program: any error inside it is the template's
        raise ChatTemplateError(f"the chat template failed on these messages ({type(exc).__name__}: {exc})") from None


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile ({exc}): fix the template or pass another") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused these messages: {message}")
