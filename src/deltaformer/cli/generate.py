"""``deltaformer generate MODEL "prompt" [--delta DIR] [sampling flags]``: continue a prompt, streaming.

The text is printed as it is generated (greedy or sampled); beam search prints its best sequence at the end.
The sampling flags are shared with ``deltaformer chat``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..generation import GenerationConfig, generate, stream_text


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The flags of :class:`~deltaformer.generation.GenerationConfig` (``generate`` and ``chat``)."""
    p.add_argument("--delta", type=Path, action="append", default=[], metavar="DIR",
                   help="decode with the delta saved in DIR (repeatable: they compose)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--do-sample", "--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p times the best one's p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already seen (1: off)")
    p.add_argument("--num-beams", "--beams", type=int, default=1, help="beam search width (1: none)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length ** this")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--truncate", action="store_true",
                   help="cut a prompt longer than the context window from the left (with a warning)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def config_from(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams, length_penalty=args.length_penalty, seed=args.seed, stop_strings=args.stop,
        truncate_prompt=args.truncate,
    )


def load_for_generation(model_arg: str, delta_dirs: list[Path], device: str) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device``, with the deltas in ``delta_dirs`` attached and active."""
    from ..delta import api
    from ..tokenizer import AutoTokenizer
    from .info import _load

    path, model = _load(model_arg, delta_dirs)
    if not hasattr(model, "new_cache") and not hasattr(getattr(model, "backbone", None), "decode"):
        raise ConfigError(f"{model_arg} is a {type(model).__name__}, which has no decoder to generate with: use a "
                          "causal LM (GPT-2, Llama, e.g. smollm2-135m) or an LED")
    if delta_dirs:
        api.set_active(model, list(api.deltas(model)))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a prompt with a decoder LM, streaming the text",
        description="Continue PROMPT ('-' reads it from stdin) with MODEL (directory or asset name), printing the "
        "text as it is generated.",
    )
    p.add_argument("model", help="model directory or asset name (e.g. smollm2-135m)")
    p.add_argument("prompt", help="text to continue; '-' reads standard input")
    add_generation_flags(p)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ConfigError("the prompt is empty: pass some text to continue")
    config = config_from(args)
    model, tokenizer = load_for_generation(args.model, args.delta, args.device)
    if config.num_beams > 1:
        ids = torch.tensor([tokenizer.encode(prompt)], device=args.device)
        out = generate(model, ids, config=config, tokenizer=tokenizer)
        print(tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
        return 0
    for piece in stream_text(model, tokenizer, prompt, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
