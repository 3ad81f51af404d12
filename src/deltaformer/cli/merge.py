"""``deltaformer merge RUN_DIR --out DIR``: fold a run's delta into the base weights, giving a plain HF
checkpoint (config.json + model.safetensors + tokenizer) that loads without deltaformer's delta code."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..models.base import PreTrainedModel
from ..train.methods import MERGEABLE, merge_method
from ..train.runs import load_run, read_run_info


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge a run's delta into its base model and save a plain HF checkpoint",
        description="Merge RUN_DIR's delta (LoRA, IA3, BitFit) into the base weights and write a plain "
        "Hugging Face directory. Methods that add computation (adapters, prefixes, prompts) cannot be merged.",
    )
    p.add_argument("run_dir", type=Path, help="run directory (the --out of `deltaformer finetune`)")
    p.add_argument("--out", type=Path, required=True, help="directory for the merged checkpoint")


def run(args: argparse.Namespace) -> int:
    method = read_run_info(args.run_dir)["method"]
    if method not in MERGEABLE:
        raise ConfigError(
            f"{args.run_dir} was trained with --method {method}, which adds layers or tokens rather than "
            f"changing weights, so it cannot be merged; mergeable methods: {', '.join(sorted(MERGEABLE))}"
        )
    loaded = load_run(args.run_dir)
    model = merge_method(loaded.model, loaded.method)
    assert isinstance(model, PreTrainedModel)  # merging unwraps every delta, leaving the plain model
    model.save_pretrained(args.out)
    loaded.tokenizer.save_pretrained(args.out)
    print(f"merged {method} run {args.run_dir} into a plain checkpoint at {args.out}")
    return 0
