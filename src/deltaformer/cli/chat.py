"""``deltaformer chat MODEL [--delta DIR]``: an interactive, streaming chat that keeps the conversation.

Each turn renders the whole history through the model's chat template (its tokenizer's
``apply_chat_template``; a plain instruction/response layout for models without one) and streams the reply.
``/reset`` forgets the history, ``/exit`` (or end of input) quits. When standard input is not a terminal, each
line is one user message and no prompt marks are printed, so a conversation can be piped in (and tested).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from ..errors import PromptError
from ..generation import stream_text
from ..prompting.chat import PLAIN, ChatFormat
from .generate import add_generation_flags, config_from, load_for_generation


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a decoder LM (streaming, with history; /reset, /exit)",
        description="Chat with MODEL. Type a message and press enter; /reset starts over, /exit quits. Reads one "
        "message per line from standard input when it is not a terminal.",
    )
    p.add_argument("model", help="model directory or asset name (e.g. smollm2-135m)")
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    add_generation_flags(p, max_new_tokens=256)


def _lines(interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if config.num_beams > 1:
        config = config.replace(num_beams=1)  # a chat streams: one token at a time
    model, tokenizer = load_for_generation(args.model, args.delta, args.device)
    try:
        chat = ChatFormat.from_tokenizer(tokenizer)
    except PromptError:  # no template: the plain layout, ended by the tokenizer's eos
        chat = PLAIN
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        ids = tokenizer.encode(chat.render(history, True), add_special_tokens=False)
        reply = []
        for piece in stream_text(model, tokenizer, ids, config):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
