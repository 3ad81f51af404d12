"""``deltaformer convert-long MODEL --max-length 4096 --window 256 --out DIR``: a BERT becomes a Longformer.

Positions are copied over and over to the new length and the global projections start as the local ones
(allenai's recipe); the result loads in ``transformers.LongformerModel`` as in deltaformer. Fine-tune it
on long inputs before trusting it beyond the old length.
"""

from __future__ import annotations

import argparse

from ..convert.longformer import convert_bert_to_longformer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert-long",
        help="turn a BERT checkpoint into a Longformer that reads long documents",
        description="Write a Longformer (sliding-window + global attention, linear memory) made from a BERT "
        "checkpoint: position table tiled to --max-length, global projections copied from the local ones, "
        "tokenizer files copied. A BERT sequence classifier keeps its head.",
    )
    p.add_argument("model", help="BERT model directory or asset name (e.g. minilm)")
    p.add_argument("--max-length", type=int, default=4096, help="longest input in tokens (default 4096)")
    p.add_argument("--window", type=int, default=256,
                   help="tokens seen on each side (default 256; Hugging Face's attention_window is twice this)")
    p.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    out = convert_bert_to_longformer(args.model, args.max_length, args.window, args.out)
    print(f"wrote a Longformer ({args.max_length} positions, window {args.window} per side) to {out}")
    return 0
