"""Flags shared by ``evaluate`` and ``finetune`` for prompts: templates, verbalizers, demonstrations.

``deltaformer evaluate MODEL --task T --template "..." --verbalizer FILE_OR_JSON [--shots K] [--calibrate]``
scores a model zero- or few-shot; ``deltaformer finetune MODEL --task T --few-shot N --template ...
--verbalizer ...`` trains prompt-based (PET); ``deltaformer finetune MODEL --instructions FILE|builtin[:-TASK]``
instruction-tunes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError


def add_template_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts (masked LMs: cloze; causal LMs: the answer continues the prompt)")
    g.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help="template with {text}, {text_b}, {mask}, {soft} / {soft:N}; repeat for several patterns")
    g.add_argument("--verbalizer", action="append", default=None, metavar="FILE_OR_JSON",
                   help='class -> label word(s), e.g. \'{"negative": "terrible", "positive": ["great", "good"]}\' or a '
                   ".json file; one for all templates or one per template")
    g.add_argument("--word-reduce", choices=("mean", "max", "first", "sum"), default=None,
                   help="how a multi-token word's token log-probabilities combine (default: mean at an MLM's masks, "
                   "sum for a causal LM)")
    g.add_argument("--class-reduce", choices=("mean", "max", "logsumexp"), default="mean",
                   help="how a class's several words combine")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (causal LMs)")


def add_demonstration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in-context learning")
    g.add_argument("--shots", type=int, default=0, help="demonstrations from the training split before each query")
    g.add_argument("--demos", choices=("random", "balanced", "nearest"), default="random",
                   help="how demonstrations are chosen (nearest: by the --encoder sentence embeddings, per query)")
    g.add_argument("--encoder", default="minilm", help="sentence encoder for --demos nearest")
    g.add_argument("--demo-max-tokens", type=int, default=None, help="cut each demonstration's text to N tokens")
    g.add_argument("--overflow", choices=("drop", "error"), default="drop",
                   help="demonstrations that do not fit max_length: drop them (counted) or stop with an error")
    g.add_argument("--calibrate", action="store_true",
                   help="also report contextual calibration (content-free inputs N/A, '' and [MASK])")
    g.add_argument("--generate", action="store_true",
                   help="also evaluate by greedy generation with label parsing (causal LMs)")


def verbalizers_from_args(args: argparse.Namespace) -> list[Any]:
    if not args.verbalizer:
        raise ConfigError("--template needs --verbalizer: name the label words of every class")
    return [_json_or_path(v) for v in args.verbalizer]


def _json_or_path(value: str) -> Any:
    if value.lstrip().startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--verbalizer is not valid JSON ({exc.msg}, column {exc.colno}): quote it whole, "
                              "e.g. '{\"negative\": \"bad\", \"positive\": \"great\"}'") from None
    return value
