"""``deltaformer quantize MODEL --scheme S --out DIR``: a quantized copy of a model that reloads packed.

Without ``--gguf``: ``DIR/config.json`` + ``DIR/quantized.safetensors`` (scheme and parameters in its metadata)
+ the tokenizer; ``from_pretrained(DIR)`` (or any verb taking a model directory) loads it with its layers still
packed. With ``--gguf``: ``DIR/model-<S>.gguf`` in GGUF's Q8_0 or Q4_1 blocks (Llama models), which llama.cpp
and ``transformers``' GGUF loader read. Nothing is written unless the whole model quantizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import QuantError
from ..quant.layers import SCHEMES

GGUF_SCHEMES = ("q8_0", "q4_1")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="write a quantized copy of a model (safetensors that reload packed, or GGUF)",
        description="Quantize every Linear layer of MODEL but its output heads (or --skip, or --all-layers) and "
                    "write it to DIR.")
    p.add_argument("model", help="model directory, GGUF file or asset name (e.g. smollm2-135m)")
    p.add_argument("--scheme", required=True,
                   help=f"one of {', '.join(SCHEMES)}; with --gguf one of {', '.join(GGUF_SCHEMES)}")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--gguf", action="store_true", help="write a GGUF file (Q8_0 or Q4_1) instead")
    p.add_argument("--skip", nargs="+", default=None, metavar="NAME",
                   help="layers kept in fp32, by path or last name (e.g. lm_head classifier); default: the output "
                        "heads (a tied LM head, the task head, the last linear), as transformers / bitsandbytes do")
    p.add_argument("--all-layers", action="store_true",
                   help="quantize every linear layer, the output heads too (instead of the default --skip)")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit block / group size (default 64)")
    p.add_argument("--granularity", default="channel", choices=("tensor", "channel", "group"),
                   help="int8 / zeropoint scale granularity (default channel)")
    p.add_argument("--group-size", type=int, default=128, help="inputs per int8 scale with --granularity group")
    p.add_argument("--no-double-quant", action="store_true", help="nf4 / fp4: keep the block scales in fp32")
    p.add_argument("--embeddings", action="store_true",
                   help="a token embedding tied to the LM head reads the quantized head's rows (no fp32 table)")


def run(args: argparse.Namespace) -> int:
    from ..models.auto import load_model
    from ..models.base import resolve_path

    scheme = args.scheme.lower()
    allowed = GGUF_SCHEMES if args.gguf else SCHEMES
    if scheme not in allowed:
        kind = "GGUF" if args.gguf else "quantization"
        hint = "" if args.gguf or scheme not in GGUF_SCHEMES else " (q8_0 / q4_1 are GGUF types: add --gguf)"
        raise QuantError(f"unknown {kind} scheme {args.scheme!r}: choose one of {', '.join(allowed)}{hint}")
    if args.skip is not None and args.all_layers:
        raise QuantError("--skip and --all-layers contradict each other: give one")
    if args.gguf and (args.skip is not None or args.all_layers):
        raise QuantError("--skip / --all-layers do not apply to --gguf (GGUF keeps 1-D tensors in F32, the rest "
                         "in its type)")
    if args.out.exists() and not args.out.is_dir():
        raise QuantError(f"--out {args.out} is a file: give a directory")
    path = resolve_path(args.model)
    model = load_model(path)
    tokenizer = _tokenizer(path)
    if args.gguf:
        from ..checkpoints.gguf_writer import save_gguf

        out = save_gguf(model, args.out / f"model-{scheme.upper()}.gguf", scheme.upper(), tokenizer=tokenizer)
    else:
        from ..quant.files import save_quantized
        from ..quant.layers import default_skip, quantize

        skip = () if args.all_layers else tuple(args.skip) if args.skip is not None else \
            default_skip(model, tied=not args.embeddings)
        options = {"scheme": scheme, "skip": list(skip), "blocksize": args.blocksize,
                   "granularity": args.granularity, "group_size": args.group_size,
                   "double_quant": not args.no_double_quant, "embeddings": args.embeddings}
        quantize(model, scheme, skip=skip, blocksize=args.blocksize,
                 double_quant=not args.no_double_quant, granularity=args.granularity, group_size=args.group_size,
                 embeddings=args.embeddings)
        out = save_quantized(model, args.out, tokenizer=tokenizer, options=options)
    print(f"wrote {scheme} {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _tokenizer(path: Path):
    """The model's tokenizer when it has one (a directory of weights alone is quantized without)."""
    from ..errors import DeltaformerError
    from ..tokenizer import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (DeltaformerError, OSError, ValueError):
        return None
