"""``deltaformer serve MODEL [--delta NAME=DIR ...]``: an OpenAI-compatible HTTP server where every request
names its own delta (``MODEL:NAME``) and requests of different deltas decode in one batch."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

import torch

from ..errors import ConfigError
from ..serving.settings import ServeConfig

log = logging.getLogger("deltaformer")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(ServeConfig) if f.name == name)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a causal LM and its deltas over an OpenAI-compatible HTTP API",
        description="Serve MODEL (a checkpoint directory, a .gguf file or an asset name) on "
        "/v1/completions, /v1/chat/completions and /v1/models. A request's 'model' is MODEL for the bare "
        "model or MODEL:NAME for a delta given with --delta NAME=DIR; requests of different deltas decode "
        "together. Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("model", help="causal LM: checkpoint directory, .gguf file or asset name")
    p.add_argument("--delta", action="append", default=[], metavar="NAME=DIR",
                   help="load the delta files in DIR (ours or peft's, any method) as NAME; repeatable")
    p.add_argument("--name", help="the served model's name (default: MODEL's file or directory name)")
    p.add_argument("--host", default="127.0.0.1", help=_help("host"))
    p.add_argument("--port", type=int, default=8000, help=_help("port"))
    p.add_argument("--api-key", help=_help("api_key"))
    p.add_argument("--max-batch", type=int, default=8, help=_help("max_batch"))
    p.add_argument("--max-queue", type=int, default=64, help=_help("max_queue"))
    p.add_argument("--max-prompt-tokens", type=int, help=_help("max_prompt_tokens"))
    p.add_argument("--max-tokens-limit", type=int, default=512, help=_help("max_tokens_limit"))
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help=_help("max_body_bytes"))
    p.add_argument("--delta-root", action="append", default=[], metavar="DIR", help=_help("delta_roots"))
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype while serving")


def parse_deltas(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--delta {item!r} must be NAME=DIR, e.g. --delta support-bot=runs/support/delta")
        pairs.append((name, directory))
    names = [n for n, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--delta names {', '.join(twice)} more than once: give each delta its own name")
    return pairs


def run(args: argparse.Namespace) -> int:
    from ..serving.errors import ApiError
    from ..serving.server import load_service, serve

    settings = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                           max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                           max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                           delta_roots=tuple(args.delta_root))
    try:
        service = load_service(args.model, settings, parse_deltas(args.delta), name=args.name,
                               chat_template=args.chat_template, device=args.device, dtype=DTYPES[args.dtype])
    except ApiError as exc:  # a --delta that does not load is the operator's error, not a request's
        raise ConfigError(exc.message) from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it",
                    settings.host)
    names = ", ".join(service.registry.names())
    print(f"serving {names} on http://{settings.host}:{settings.port}/v1 (Ctrl-C stops)", flush=True)
    serve(service)
    return 0
