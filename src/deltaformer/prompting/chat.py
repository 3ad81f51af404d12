"""Chat formats: how a conversation becomes text, split into the fixed glue around each message.

A :class:`ChatFormat` wraps a renderer ``render(messages, add_generation_prompt) -> str``: a tokenizer's own
chat template (``tokenizer.apply_chat_template``) or :data:`PLAIN`, an instruction/response layout for models
without one. Prompts and training examples are laid out by :meth:`ChatFormat.glue`, which renders the
conversation once with a unique sentinel as each message's content and cuts the text at the sentinels; what
lies between them is the template's own text (role headers, end-of-turn markers). The message contents are
then tokenized piece by piece, so truncation, soft tokens and the loss mask work on any template, including
templates without generation markers: the assistant's tokens are exactly the pieces that hold its contents
plus the glue that closes its turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import PromptError

Message = dict[str, str]
Renderer = Callable[[list[Message], bool], str]
ROLES = ("system", "user", "assistant")


def _sentinel(i: int) -> str:
    return f"\u27e6deltaformer-message-{i}\u27e7"


@dataclass(frozen=True)
class ChatFormat:
    """``render(messages, add_generation_prompt)``; ``closes_turns``: the template itself ends each turn (an
    end-of-turn marker); when it does not (:data:`PLAIN`), training appends the tokenizer's eos after each
    reply so the model learns to stop."""

    name: str
    render: Renderer
    closes_turns: bool = True

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        """The tokenizer's chat template; refuses a tokenizer without one (use :data:`PLAIN` instead)."""
        apply = getattr(tokenizer, "apply_chat_template", None)
        template = getattr(tokenizer, "chat_template", None)
        if apply is None or not template:
            raise PromptError("this tokenizer has no chat template: leave out --chat (plain prompts) or use a "
                              "model that ships one (e.g. smollm2-135m)")

        def render(messages: list[Message], add_generation_prompt: bool) -> str:
            return apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

        return cls("tokenizer", render, closes_turns=True)

    def glue(self, roles: Sequence[str], add_generation_prompt: bool) -> list[str]:
        """The template text before, between and after ``len(roles)`` messages (``len(roles) + 1`` strings)."""
        for role in roles:
            if role not in ROLES:
                raise PromptError(f"unknown chat role {role!r}: use one of {', '.join(ROLES)}")
        messages = [{"role": role, "content": _sentinel(i)} for i, role in enumerate(roles)]
        text = self.render(messages, add_generation_prompt)
        out, pos = [], 0
        for i in range(len(roles)):
            at = text.find(_sentinel(i), pos)
            if at < 0:
                raise PromptError(f"the {self.name} chat template does not show message {i} ({roles[i]}) as written "
                                  "(it changes or drops contents): use another chat template or plain prompts")
            out.append(text[pos:at])
            pos = at + len(_sentinel(i))
        out.append(text[pos:])
        return out


def _plain(messages: list[Message], add_generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        header = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}[m["role"]]
        parts.append(f"{header}{m['content']}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


#: Instruction / response layout (Alpaca's headers) for models without a chat template.
PLAIN = ChatFormat("plain", _plain, closes_turns=False)
