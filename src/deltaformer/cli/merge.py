"""``deltaformer merge RUN_DIR --out DIR``: fold a run's delta into the base weights, giving a plain HF
checkpoint (config.json + model.safetensors + tokenizer) that loads without deltaformer's delta code.

A run trained on a quantized base (``--method qlora``, ``--quantize``) merges into its dequantized weights,
exactly what the delta learned against, and the price of quantizing the merged weights again with the run's
scheme is reported before anything ships: per layer the relative error, and the change in logits and
predictions on held-out examples (the run's test data). ``--quantize S`` reports that price for S on an fp32
run too; a run trained on one scheme is refused for another. Nothing is written when anything is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.base import PreTrainedModel
from ..train.methods import MERGEABLE, QUANTIZE, MethodSpec, merge_method, quantize_base
from ..train.runs import LoadedRun, load_run, read_run_info


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge a run's delta into its base model and save a plain HF checkpoint",
        description="Merge RUN_DIR's delta (LoRA, IA3, BitFit) into the base weights and write a plain "
        "Hugging Face directory. Methods that add computation (adapters, prefixes, prompts) cannot be merged. "
        "A run on a quantized base merges into the dequantized weights, and the cost of quantizing the merge "
        "again is reported (per layer, and on held-out logits) and saved as merge_report.json.",
    )
    p.add_argument("run_dir", type=Path, help="run directory (the --out of `deltaformer finetune`)")
    p.add_argument("--out", type=Path, required=True, help="directory for the merged checkpoint")
    p.add_argument("--quantize", choices=tuple(QUANTIZE), default=None,
                   help="report the cost of quantizing the merged weights with this scheme (default: the run's "
                   "own, for a run on a quantized base; another scheme than the run's is refused)")
    p.add_argument("--held-out", type=int, default=256,
                   help="held-out examples (the run's test data, the first N) the logits are compared on")


def run(args: argparse.Namespace) -> int:
    info = read_run_info(args.run_dir)
    method = info["method"]
    if method not in MERGEABLE:
        raise ConfigError(
            f"{args.run_dir} was trained with --method {method}, which adds layers or tokens rather than "
            f"changing weights, so it cannot be merged; mergeable methods: {', '.join(sorted(MERGEABLE))}"
        )
    trained = MethodSpec(method, info.get("method_options", {})).quantize
    if trained is not None and args.quantize is not None and args.quantize != trained:
        raise ConfigError(f"{args.run_dir} was trained on a {trained} base: its delta learned against {trained}'s "
                          f"rounding, so merging it into a {args.quantize} base would not give what it learned; "
                          f"drop --quantize (or pass --quantize {trained}), or train on {args.quantize}")
    if args.held_out < 1:
        raise ConfigError(f"--held-out must be at least 1, got {args.held_out}")
    scheme = args.quantize or trained
    if scheme is None:
        loaded = load_run(args.run_dir)
        model = merge_method(loaded.model, loaded.method)
        _save(model, loaded, args.out, None)
        print(f"merged {method} run {args.run_dir} into a plain checkpoint at {args.out}")
        return 0
    report = _price(args, info, scheme, trained)
    loaded = load_run(args.run_dir)
    from ..quant.merge import dequantize_base

    model = merge_method(dequantize_base(loaded.model), loaded.method)
    _save(model, loaded, args.out, report.to_json())
    print(report.format())
    print(f"merged {method} run {args.run_dir} into its dequantized base: a plain fp32 checkpoint at {args.out} "
          f"(the report, merge_report.json beside it, is what quantizing it again with {scheme} costs)")
    return 0


def _price(args: argparse.Namespace, info: dict[str, Any], scheme: str, trained: str | None):
    """Merge into the quantized base and quantize again (an fp32 run: merge, then quantize), with the logits of
    the held-out examples compared before and after."""
    from ..data.collate import PadCollator, encode_examples
    from ..quant import merge as qmerge

    loaded = load_run(args.run_dir)
    examples = encode_examples(loaded.tokenizer, held_out(info, args.run_dir)[: args.held_out], loaded.max_length,
                               loaded.labels)
    collate = PadCollator(loaded.tokenizer.pad_token_id or 0)
    batches = [{k: v for k, v in collate(examples[i:i + 32]).items() if k != "labels"}
               for i in range(0, len(examples), 32)]
    before = qmerge.logits_of(loaded.model, batches)
    if trained is not None:
        report = qmerge.merge_quantized(loaded.model, scheme=QUANTIZE[trained]["scheme"])
    else:  # an fp32 run: merge exactly, then quantize with the scheme asked for, reporting that rounding
        model = merge_method(loaded.model, loaded.method)
        report = _quantize_cost(model, scheme)
    report.outputs = qmerge.compare(before, qmerge.logits_of(loaded.model, batches))
    return report


def held_out(info: dict[str, Any], run_dir: Path) -> list:
    """The run's test data (its task's test split, or its --test file; else its --validation file)."""
    from ..data.tabular import Fields, read_table
    from ..data.tasks import load_task

    data = info.get("data", {})
    if data.get("task"):
        return load_task(data["task"]).split("test")
    path = data.get("test") or data.get("validation")
    if not path:
        raise ConfigError(f"{run_dir} was trained without test or validation files, so there is no held-out data "
                          "to measure the merge on: re-train with --test FILE")
    fields = Fields(**data["fields"]) if data.get("fields") else Fields()
    return read_table(Path(path), fields, skip_bad_rows=True).examples


def _quantize_cost(model: torch.nn.Module, scheme: str):
    """Quantize ``model`` in place with ``scheme``; the per-layer relative error of doing so."""
    from ..quant.base import QuantizedLinear
    from ..quant.merge import LayerCost, MergeReport

    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_base(model, scheme)
    report = MergeReport(scheme=QUANTIZE[scheme]["scheme"], deltas=["default"])
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and name in weights:
            w = weights.pop(name)
            error = (module.dequantize() - w).norm() / w.norm().clamp(min=1e-30)
            report.layers.append(LayerCost(name, module.scheme, error.item(), None))
    return report


def _save(model: torch.nn.Module, loaded: LoadedRun, out: Path, report: dict[str, Any] | None) -> None:
    """Write the checkpoint (and report) to a temporary directory beside ``out``, then move it into place."""
    assert isinstance(model, PreTrainedModel)  # merging unwraps every delta, leaving the plain model
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not out.exists():
            staging.rename(out)
        else:  # replace the files of the same names, leave anything else there alone
            for item in staging.iterdir():
                item.replace(out / item.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
