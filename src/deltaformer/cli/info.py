"""``deltaformer info MODEL``: architecture, sizes, parameters per part, and bytes on disk."""

from __future__ import annotations

import argparse
import json

from ..models.auto import load_model
from ..models.base import resolve_path
from ..models.summary import analytic_count, bytes_on_disk, parameter_breakdown


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a model's architecture, sizes and parameter counts")
    p.add_argument("model", help="model directory or asset name (e.g. minilm)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    path = resolve_path(args.model)
    model = load_model(path)
    config = model.config
    parts = parameter_breakdown(model)
    total = sum(p["total"] for p in parts.values())
    trainable = sum(p["trainable"] for p in parts.values())
    report = {
        "path": str(path),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "max_positions": config.max_position_embeddings,
        "parameters": total,
        "trainable": trainable,
        "parts": parts,
        "analytic_VH_plus_12LH2": analytic_count(config),
        "bytes_on_disk": bytes_on_disk(path),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['architecture']} ({config.model_type}) from {path}")
    print(f"  layers {config.num_hidden_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}, positions {config.max_position_embeddings}")
    print(f"  {'part':<14}{'parameters':>14}{'trainable':>14}")
    for name, counts in sorted(parts.items(), key=lambda kv: -kv[1]["total"]):
        print(f"  {name:<14}{counts['total']:>14,}{counts['trainable']:>14,}")
    print(f"  {'total':<14}{total:>14,}{trainable:>14,} ({100 * trainable / max(total, 1):.2f}% trainable)")
    estimate = report["analytic_VH_plus_12LH2"]
    print(f"  analytic V*H + L*12*H^2 = {estimate:,} ({100 * estimate / total:.1f}% of exact): it leaves out "
          "position/segment embeddings, biases, LayerNorms, pooler and heads, and assumes intermediate = 4H")
    print(f"  bytes on disk: {report['bytes_on_disk']:,}")
    return 0
