"""Instruction files: JSON lines of ``instruction`` / ``input`` / ``output`` (Alpaca's keys, ``system``
optional) or of chat ``messages`` (``[{"role": "user", "content": ...}, {"role": "assistant", ...}]``).

A broken line (bad JSON, bytes that are not UTF-8, missing or mistyped keys, a conversation without an
assistant reply) stops reading with ``file:line: what is wrong``, or, with ``skip_bad_lines``, is skipped and
counted with that description; blank lines are ignored. Nothing is trained on a file that was half read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PromptError
from .chat import ROLES, Message


@dataclass(frozen=True)
class Conversation:
    """Messages in order; ``source`` is ``file:line`` or ``task#i`` for error messages."""

    messages: tuple[Message, ...]
    source: str = ""


@dataclass
class InstructionFile:
    conversations: list[Conversation]
    skipped: list[str]


def conversation_from(record: Any, source: str) -> Conversation:
    """One JSON record as a conversation; raises :class:`PromptError` naming ``source`` when it is not one."""
    if not isinstance(record, dict):
        raise PromptError(f"{source}: a line must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise PromptError(f"{source}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PromptError(f"{source}: message {j} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                                  f"text}}, got {json.dumps(m)[:80]}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise PromptError(f"{source}: the conversation has no assistant message, so nothing to learn from")
        return Conversation(tuple(out), source)
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise PromptError(f"{source}: missing or empty {key!r}: each line needs 'instruction' and 'output' "
                              "(and optionally 'input', 'system'), or 'messages'")
    for key in ("input", "system"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise PromptError(f"{source}: {key!r} must be text, got {type(record[key]).__name__}")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return Conversation(tuple(messages), source)


def read_instructions(path: str | Path, skip_bad_lines: bool = False) -> InstructionFile:
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"instruction file {path} does not exist: pass a .jsonl file or 'builtin'")
    conversations: list[Conversation] = []
    skipped: list[str] = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            source = f"{path}:{number}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PromptError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start}): save the file as "
                                      "UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{source}: invalid JSON ({exc.msg}, column {exc.colno}): fix the line or "
                                      "pass --skip-bad-lines") from None
                conversations.append(conversation_from(record, source))
            except PromptError as exc:
                if not skip_bad_lines:
                    raise
                skipped.append(str(exc))
    if not conversations:
        raise PromptError(f"{path} holds no usable instruction" + (f" ({len(skipped)} bad line(s) skipped)"
                                                                   if skipped else ""))
    return InstructionFile(conversations, skipped)
