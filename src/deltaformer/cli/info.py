"""``deltaformer info MODEL``: architecture, sizes, parameters per part, and bytes on disk; for a GGUF file, the
quantization types found in it (tensors and weights per GGML type).

MODEL may also be a run directory of ``deltaformer finetune``; deltas saved with ``save_delta`` (or by peft)
attach with ``--delta DIR``. Then the trainable-parameter summary per method and module type follows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import delta
from ..checkpoints.gguf import find_gguf, open_gguf
from ..models.auto import load_model
from ..models.base import resolve_path
from ..models.summary import analytic_count, bytes_on_disk, decoder_details, parameter_breakdown


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a model's architecture, sizes and parameter counts")
    p.add_argument("model", help="model directory or asset name (e.g. minilm)")
    p.add_argument("--delta", type=Path, action="append", default=[], metavar="DIR",
                   help="attach the delta saved in DIR (adapter_config.json + adapter_model.safetensors); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _load(model_arg: str, delta_dirs: list[Path]):
    """(path, model): a model directory or asset, or a finetune run directory, with ``delta_dirs`` attached."""
    if (Path(model_arg) / "run.json").is_file():
        from ..train.runs import load_run

        path, model = Path(model_arg), load_run(model_arg).model
    else:
        path = resolve_path(model_arg)
        model = load_model(path)
    for directory in delta_dirs:
        delta.load_delta(model, directory, name=_delta_name(directory))
    if delta_dirs:
        delta.freeze_base(model)  # count what training these deltas trains
    return path, model


def _delta_name(directory: Path) -> str:
    """A valid delta name from a folder name (letters, digits, '_' and '-')."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in directory.resolve().name) or "default"


def run(args: argparse.Namespace) -> int:
    path, model = _load(args.model, args.delta)
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
    decoder = decoder_details(config)
    if decoder is not None:
        report["decoder"] = decoder
        del report["analytic_VH_plus_12LH2"]  # the encoder textbook formula; a decoder's parts are exact above
    gguf = find_gguf(path) if path.exists() else None
    if gguf is not None:
        report["gguf"] = gguf_types(gguf)
    if delta.deltas(model):
        report["deltas"] = delta.trainable_summary(model)
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
    if decoder is not None:
        rope = (f", theta {decoder['rope_theta']:g}" + (f", scaling {decoder['rope_scaling']}" if decoder["rope_scaling"]
                else "")) if decoder["positions"] == "rope" else ""
        print(f"  decoder: {decoder['kv_heads']} key/value heads of {decoder['head_dim']}, {decoder['positions']} "
              f"positions{rope}, {decoder['norm']}, MLP {decoder['mlp']}, "
              f"{'tied' if decoder['tied_head'] else 'separate'} LM head; {_millions(total)} parameters")
    else:
        estimate = report["analytic_VH_plus_12LH2"]
        print(f"  analytic V*H + L*12*H^2 = {estimate:,} ({100 * estimate / total:.1f}% of exact): it leaves out "
              "position/segment embeddings, biases, LayerNorms, pooler and heads, and assumes intermediate = 4H")
    print(f"  bytes on disk: {report['bytes_on_disk']:,}")
    if "gguf" in report:
        types = report["gguf"]
        tensors = ", ".join(f"{n} {kind}" for kind, n in types["tensors"].items())
        weights = ", ".join(f"{_millions(n)} {kind}" for kind, n in types["weights"].items())
        print(f"  GGUF {Path(types['file']).name}: tensors {tensors}; weights {weights}")
    if "deltas" in report:
        print(delta.format_summary(report["deltas"]))
    return 0


def gguf_types(path: Path) -> dict[str, object]:
    """The GGML types of a GGUF file's tensors: how many tensors, and how many weights, of each."""
    infos = open_gguf(path).tensor_infos().values()
    weights: dict[str, int] = {}
    for info in infos:
        count = 1
        for n in info.shape:
            count *= n
        weights[info.type.name] = weights.get(info.type.name, 0) + count
    return {"file": str(path), "tensors": open_gguf(path).type_counts(),
            "weights": dict(sorted(weights.items(), key=lambda kv: -kv[1]))}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
