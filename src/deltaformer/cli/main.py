"""Entry point: ``deltaformer <verb> [options]``.

Each verb lives in ``deltaformer.cli.<verb>`` and defines ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors deltaformer raises on bad input are printed as one line (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import DeltaformerError

#: Verb modules in the order ``--help`` lists them.
VERBS = (
    "fetch",
    "info",
    "tasks",
    "finetune",
    "pretrain",
    "tokenizer",
    "evaluate",
    "predict",
    "generate",
    "chat",
    "merge",
    "quantize",
    "demo",
    "convert_long",
    "plot_attention",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaformer",
        description="Build, pretrain, adapt and compress Transformer language models in plain PyTorch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        module = importlib.import_module(f"deltaformer.cli.{verb}")
        before = set(subparsers.choices)
        module.add_parser(subparsers)
        for name in set(subparsers.choices) - before:
            subparsers.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.run(args) or 0)
    except DeltaformerError as exc:
        print(f"deltaformer {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
