"""Quantization speed and memory: our quantized layers against our fp32 model (and torchao) in the same run.

One JSON line per measurement (``--out FILE`` also writes them there), every timing a median of ``--repeats``
interleaved runs (benchmarks/timing.py) at ``torch.set_num_threads(--threads)``:

* ``decode``: SmolLM2-135M greedy decoding, batch 1, a ``--prompt``-token prompt and ``--new`` new tokens (eos
  off): tokens/s of fp32, ours int8 weight-only (``_weight_int8pack_mm``), ours int4 (groups of 32,
  ``_weight_int4pack_mm_for_cpu``) and torchao's ``Int8WeightOnlyConfig`` on the same fp32 model; ``speedup``
  against fp32 (targets: int8 >= 1.3, int4 >= 1.0) and ours int8 against torchao (target >= 1.0);
  ``same_ids``: fraction of new tokens equal to fp32's. Every linear layer is quantized, the LM head included,
  and the tied token table reads the quantized head (``embeddings=True``).
* ``weight_memory``: bytes of every parameter and buffer of each model (shared storage counted once), against
  fp32 (targets: int8 <= 0.30, 4-bit <= 0.17), and of the linear layers alone.
* ``minilm_w8a8``: MiniLM forward of a 32 x 128 batch, fp32 against W8A8 (int8 weights, activations quantized
  per token, ``torch._int_mm``), target >= 1.5; ``rel_diff``: relative (Frobenius) difference of the last
  hidden state.
* ``bytes_per_weight``: storage of each scheme on a 1536 x 576 layer (SmolLM2's MLP), double quantization's
  saving included.

    python benchmarks/quantization.py [--prompt 32] [--new 32] [--repeats 5] [--threads 1] [--out FILE]
    python benchmarks/quantization.py --quick      # 8-token prompt, 4 new tokens, 1 repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from timing import interleaved_medians
from torch import nn

from deltaformer.generation import generate
from deltaformer.models import LlamaForCausalLM
from deltaformer.models.auto import load_model
from deltaformer.quant import kernels
from deltaformer.quant.layers import QuantLinear, quantize
from deltaformer.tokenizer import AutoTokenizer

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed how books "
        "were made, sold and read across Europe. ")


def weight_bytes(model: nn.Module, linear_only: bool = False) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied tables are one table)."""
    seen: set[int] = set()
    total = 0
    modules = [m for m in model.modules() if isinstance(m, nn.Linear | QuantLinear)] if linear_only else [model]
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            inner = getattr(tensor, "__tensor_flatten__", None)
            parts = [getattr(tensor, name) for name in inner()[0]] if callable(inner) else [tensor]
            for part in parts:  # a tensor subclass (torchao) holds its data in inner tensors
                storage = part.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def greedy(model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    return generate(model, ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0)


def torchao_int8(model: nn.Module) -> nn.Module | None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    # our Linear runs oneDNN's fused op, which torchao's tensor subclass does not implement: plain nn.Linear
    # modules holding the same weights let torchao run its own int8 product
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight, plain.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def decode_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    fp32 = LlamaForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor([tokenizer.encode(TEXT * (1 + args.prompt // 20))[:args.prompt]])
    models: dict[str, nn.Module] = {"fp32": fp32}
    models["int8"] = quantize(copy.deepcopy(fp32), "int8", embeddings=True).eval()
    models["int4"] = quantize(copy.deepcopy(fp32), "int4", blocksize=32, embeddings=True).eval()
    theirs = torchao_int8(copy.deepcopy(fp32))
    if theirs is not None:
        models["torchao_int8"] = theirs.eval()
    with torch.inference_mode():
        outs = {name: greedy(m, ids, args.new)[0, -args.new:] for name, m in models.items()}
        ms = interleaved_medians({name: (lambda m=m: greedy(m, ids, args.new)) for name, m in models.items()},
                                 args.repeats)
    rows = []
    tps = {name: args.new / ms[name] * 1000 for name in models}
    targets = {"int8": 1.3, "int4": 1.0}
    for name in models:
        row: dict[str, Any] = {"mode": "decode", "variant": name, "prompt": args.prompt, "new": args.new,
                               "tokens_per_s": round(tps[name], 2), "fp32_tokens_per_s": round(tps["fp32"], 2),
                               "speedup": round(tps[name] / tps["fp32"], 3),
                               "same_ids": round(float((outs[name] == outs["fp32"]).float().mean()), 3)}
        if name in targets:
            row["target"] = targets[name]
        if name == "int8" and "torchao_int8" in tps:
            row["torchao_tokens_per_s"] = round(tps["torchao_int8"], 2)
            row["vs_torchao"] = round(tps["int8"] / tps["torchao_int8"], 3)
            row["vs_torchao_target"] = 1.0
        rows.append(row)
    full, lin = weight_bytes(fp32), weight_bytes(fp32, linear_only=True)
    for name, m in models.items():
        if name == "fp32":
            continue
        b, bl = weight_bytes(m), weight_bytes(m, linear_only=True)
        row = {"mode": "weight_memory", "variant": name, "mib": round(b / 2**20, 1),
               "fp32_mib": round(full / 2**20, 1), "ratio": round(b / full, 3),
               "linear_mib": round(bl / 2**20, 1), "fp32_linear_mib": round(lin / 2**20, 1),
               "linear_ratio": round(bl / lin, 3)}
        if name in targets:
            row["target"] = 0.30 if name == "int8" else 0.17
        rows.append(row)
    return rows


def minilm_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    fp32 = load_model("minilm").eval()
    w8a8 = quantize(copy.deepcopy(fp32), "w8a8", skip=()).eval()  # every linear, the pooler too
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    mask = torch.ones_like(ids)
    with torch.no_grad():  # (not inference mode: its tensors have no version counter, so the W8A8 layers could
        # not reuse the query / key / value input's quantization)
        a, b = fp32(ids, attention_mask=mask), w8a8(ids, attention_mask=mask)
        ha, hb = a.last_hidden_state, b.last_hidden_state
        diff = float((ha - hb).norm() / ha.norm())
        ms = interleaved_medians({"fp32": lambda: fp32(ids, attention_mask=mask),
                                  "w8a8": lambda: w8a8(ids, attention_mask=mask)}, args.repeats)
    return [{"mode": "minilm_w8a8", "batch": args.batch, "length": args.length, "fp32_ms": round(ms["fp32"], 1),
             "w8a8_ms": round(ms["w8a8"], 1), "speedup": round(ms["fp32"] / ms["w8a8"], 3), "target": 1.5,
             "rel_diff": round(diff, 4), "int_mm": kernels.has_int_mm()}]


def bytes_rows() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False)
    cases = [("int8", {}), ("int8", {"granularity": "group", "group_size": 64}), ("zeropoint", {}),
             ("llm_int8", {}), ("w8a8", {}), ("nf4", {}), ("nf4", {"double_quant": False}), ("fp4", {}),
             ("int4", {"blocksize": 32}), ("int4", {"blocksize": 64})]
    rows = []
    for scheme, kw in cases:
        layer = QuantLinear(lin, scheme, **kw)
        stored = sum(b.numel() * b.element_size() for b in layer.buffers())
        err = float((layer.dequantize() - lin.weight.detach()).norm() / lin.weight.detach().norm())
        rows.append({"mode": "bytes_per_weight", "scheme": scheme, **kw,
                     "bytes_per_weight": round(stored / lin.weight.numel(), 4),
                     "bits_per_weight": round(8 * stored / lin.weight.numel(), 3), "rel_error": round(err, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="asset name or directory of a Llama-family LM")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="MiniLM batch (default 32)")
    parser.add_argument("--length", type=int, default=128, help="MiniLM sequence length (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="decode,minilm,bytes", help="comma-separated parts to run")
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.prompt, args.new, args.repeats, args.batch, args.length = 8, 4, 1, 2, 16
    torch.set_num_threads(args.threads)
    parts = set(args.only.split(","))
    rows: list[dict[str, Any]] = []
    if "bytes" in parts:
        rows += bytes_rows()
    if "minilm" in parts:
        rows += minilm_rows(args)
    if "decode" in parts:
        rows += decode_rows(args)
    lines = [json.dumps({"benchmark": "quantization", "model": args.model if row["mode"] in ("decode", "weight_memory")
                         else "minilm" if row["mode"] == "minilm_w8a8" else None, "threads": args.threads, **row})
             for row in rows]
    for line in lines:
        print(line, flush=True)
    if args.out:
        args.out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    main()
