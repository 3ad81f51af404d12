"""Quality of quantized bases, and the QLoRA training step: what quantizing costs, measured on this CPU.

Sections (each appends JSON lines to ``--out``, default ``benchmarks/quantization_quality_cpu.jsonl``):

* ``perplexity``: SmolLM2-135M next-token perplexity on held-out Brown text (``--blocks`` blocks of 256 tokens
  from Brown documents 0, 25, 50, ...). The reference is the fp32 model whose weights are the GGUF file's Q4_1
  blocks dequantized; every linear layer of the blocks is then quantized (the tied LM head and token table stay
  fp32: ``quantize``'s default, as in transformers / bitsandbytes; one variant quantizes the head too) with int8
  (absmax per output channel; also through the bf16 CPU kernel, and per group of 64 beside), LLM.int8 and NF4
  with double quantization, with bitsandbytes' LLM.int8 (CPU build) beside and its NF4 weights compared with
  ours (the largest difference over every weight: 0 means the same model, the same perplexity). Each
  change has its standard error from the per-block differences (paired), each scheme its per-layer relative
  weight error, and a grid check sets NF4's error on the Q4_1 values beside its error on weights moved off that
  grid. Targets: int8 / LLM.int8 within +0.5%, NF4 within +5%.
* ``outliers``: per projection of SmolLM2, how many input features reach LLM.int8's threshold (6.0) on Brown text.
* ``bytes``: bytes per weight of each scheme, from the buffers of SmolLM2's quantized block linears.
* ``accuracy``: MiniLM fully fine-tuned on rt-polarity (fp32, seed 0), then every linear layer but its
  classifier quantized with int8, LLM.int8, NF4 (double quantization) and W8A8 (int8 weights and activations):
  test accuracy within 0.5 point (int8, LLM.int8, W8A8) and 1 point (NF4) of fp32; flipped predictions counted.
* ``qlora``: QLoRA (NF4 + double quantization) against LoRA on rt-polarity with MiniLM, the same LoRA settings,
  3 seeds: mean test accuracy within 1 point.
* ``step``: one training step of SmolLM2 with LoRA r=8 on every linear layer, 4 x 256 tokens: QLoRA against
  LoRA on the fp32 base (peak memory <= 0.6x, time <= 1.5x), and bitsandbytes' CPU 4-bit (NF4, double
  quantization) with peft's LoRA on transformers' Llama beside them. Each config runs in its own subprocess;
  peak memory is the resident set's high-water mark during the steps minus the interpreter's resident set
  before the model was loaded (weights + step), the mark reset once the model is built (loading's fp32
  transient is not counted for anyone).

The machine is a shared 2-core CPU: runs are bounded (subsets: ``--train/--validation/--test``, ``--blocks``), torch runs one
thread (on a loaded machine a second thread mostly waits at barriers), and every record says what it used.

    nice -n 15 python benchmarks/quantization_quality.py [--sections perplexity,accuracy,qlora,step] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import rss_mark, rss_peak_mib  # noqa: E402

HERE = Path(__file__).resolve().parent


def device_note() -> str:
    return f"cpu ({torch.get_num_threads()} thread, {platform.machine()}, load {os.getloadavg()[0]:.1f})"


def emit(out: Path, record: dict[str, Any]) -> None:
    record = {**record, "device": device_note(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    line = json.dumps(record)
    print(line, flush=True)
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


# --- perplexity -----------------------------------------------------------------------------------------

def brown_blocks(tokenizer, blocks: int, length: int) -> torch.Tensor:
    """``blocks`` rows of ``length`` tokens: Brown documents 0, 25, 50, ... (every genre, a fixed choice)."""
    from deltaformer.data.corpus import iter_documents

    docs = list(iter_documents(["brown"]))
    ids: list[int] = []
    for doc in docs[::25]:
        ids += tokenizer(" ".join(doc), add_special_tokens=False)["input_ids"]
        if len(ids) >= blocks * length:
            break
    if len(ids) < blocks * length:
        raise SystemExit(f"Brown documents 0, 25, 50, ... hold {len(ids)} tokens, fewer than {blocks} x {length}")
    return torch.tensor(ids[:blocks * length]).view(blocks, length)


def block_nll(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each row (float64)."""
    out = []
    model.eval()
    with torch.no_grad():
        for row in rows:
            logits = model(row[None]).logits[0, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits, row[1:]).double())
    return torch.stack(out)


def perplexity(model, rows: torch.Tensor) -> float:
    return math.exp(block_nll(model, rows).mean().item())


def _plain_linears(model) -> list[tuple[str, Any]]:
    from deltaformer.nn.linear import PLAIN_LINEARS

    return [(n, m) for n, m in model.named_modules() if type(m) in PLAIN_LINEARS and n != "lm_head"]


def bnb_llm_int8(model, threshold: float = 6.0):
    """Every block linear of ``model`` as bitsandbytes' ``Linear8bitLt`` (its CPU build, eval mode: int8
    vector-wise products with outlier columns >= ``threshold`` in floating point), in place."""
    import bitsandbytes as bnb

    for name, module in _plain_linears(model):
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(module.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu").eval())
    return model


def bnb_nf4_difference(reference) -> float:
    """Largest difference between bitsandbytes' NF4 round trip (blocks of 64, double quantization) and ours,
    over every block linear's weight: 0.0 means the NF4 model is the same model (the same perplexity)."""
    import bitsandbytes.functional as bnbf

    from deltaformer.quant.layers import QuantLinear

    largest = 0.0
    for _, module in _plain_linears(reference):
        packed, state = bnbf.quantize_4bit(module.weight.detach(), blocksize=64, compress_statistics=True,
                                          quant_type="nf4")
        theirs = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        ours = QuantLinear(module, "nf4", blocksize=64, double_quant=True).dequantize()
        largest = max(largest, float((theirs - ours).abs().max()))
    return largest


def layer_errors(reference, scheme: str, **options) -> dict[str, dict[str, float]]:
    """Relative (Frobenius) error of each block linear's dequantized weight, mean and max per projection."""
    from deltaformer.quant.layers import QuantLinear

    errors: dict[str, list[float]] = {}
    for name, module in _plain_linears(reference):
        w = module.weight.detach()
        err = (QuantLinear(module, scheme, **options).dequantize() - w).norm() / w.norm()
        errors.setdefault(name.rsplit(".", 1)[-1], []).append(float(err))
    return {k: {"mean": round(statistics.mean(v), 5), "max": round(max(v), 5)} for k, v in sorted(errors.items())}


def grid_check(reference) -> dict[str, Any]:
    """Is re-quantizing the Q4_1 grid onto NF4's worse than NF4 on weights off that grid?

    Each block linear's weights are moved off the Q4_1 grid by uniform noise within their block's Q4_1 step
    (weights whose Q4_1 rounding gives the file's values back); NF4's relative error on those is set beside its
    error on the file's values, and Q4_1's own error on them (what the file's 4 bits already cost)."""
    from deltaformer.quant import schemes

    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"nf4_on_q4_1_weights": [], "nf4_on_off_grid_weights": [],
                                   "q4_1_on_off_grid_weights": []}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    def q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = w.reshape(-1, 32)
        low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        step = (high - low) / 15
        codes = ((blocks - low) / step.clamp(min=1e-30)).round().clamp(0, 15)
        return (codes * step + low).view_as(w), step

    def nf4(w: torch.Tensor) -> torch.Tensor:
        return schemes.nf4(w, 64, double_quant=True).rows(0, w.shape[0])

    for _, module in _plain_linears(reference):
        w = module.weight.detach().float()
        back, step = q4_1(w)
        if not torch.allclose(back, w, atol=1e-6):
            raise SystemExit("the reference weights are not on a Q4_1 grid")
        off = (w.reshape(-1, 32) + (torch.rand(w.numel() // 32, 32, generator=gen) - 0.5) * step).view_as(w)
        out["nf4_on_q4_1_weights"].append(rel(nf4(w), w))
        out["nf4_on_off_grid_weights"].append(rel(nf4(off), off))
        out["q4_1_on_off_grid_weights"].append(rel(q4_1(off)[0], off))
    return {k: round(statistics.mean(v), 5) for k, v in out.items()}


#: The perplexity section's variants: (name, scheme or reference, quantize() options, target %, note).
PPL_VARIANTS: list[tuple[str, str, dict[str, Any], float | None, str]] = [
    ("int8", "int8", {"granularity": "channel"}, 0.5, "absmax per output channel, fp32 blockwise product"),
    ("int8 (bf16 kernel)", "int8", {"granularity": "channel", "kernels": True}, 0.5,
     "the same weights through _weight_int8pack_mm (bf16 activations and scales): the default CPU inference path"),
    ("int8 per group of 64", "int8", {"granularity": "group", "group_size": 64}, 0.5,
     "absmax per 64 inputs of a row (not the target's scheme: what per-channel misses)"),
    ("llm.int8", "llm_int8", {}, 0.5, "int8 vector-wise products, input features with |x| >= 6.0 in fp32"),
    ("llm.int8 (bitsandbytes)", "bnb_llm_int8", {}, 0.5, "bitsandbytes' Linear8bitLt, CPU build, threshold 6.0"),
    ("nf4", "nf4", {"blocksize": 64, "double_quant": True}, 5.0, "NF4, blocks of 64, double quantization"),
    ("nf4, head too", "nf4", {"blocksize": 64, "double_quant": True, "skip": ()}, None,
     "the tied LM head quantized as well (skip=())"),
]


def section_perplexity(args, out: Path) -> None:
    import copy

    from deltaformer.models import LlamaForCausalLM
    from deltaformer.quant.layers import QuantLinear, quantize
    from deltaformer.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m")
    rows = brown_blocks(tokenizer, args.blocks, 256)
    reference = LlamaForCausalLM.from_pretrained("smollm2-135m")
    start = time.perf_counter()
    base_nll = block_nll(reference, rows)
    base = math.exp(base_nll.mean().item())
    common = {"section": "perplexity", "model": "smollm2-135m (Q4_1 GGUF, dequantized = fp32 reference)",
              "text": f"Brown documents 0, 25, 50, ... concatenated: {rows.shape[0]} blocks of {rows.shape[1]} "
                      "tokens", "tokens": rows.numel(),
              "quantized": "every linear layer of the blocks; the tied LM head / token table stay fp32 "
                           "(quantize's default skip) unless the variant says otherwise"}
    emit(out, {**common, "scheme": "fp32", "perplexity": base, "seconds": round(time.perf_counter() - start, 1)})
    emit(out, {**common, "scheme": "grid check", **grid_check(reference)})
    wanted = args.ppl_variants.split(",") if args.ppl_variants else [v[0] for v in PPL_VARIANTS]
    for name, scheme, options, target, note in PPL_VARIANTS:
        if name not in wanted:
            continue
        options = dict(options)
        kernels = options.pop("kernels", False)
        model = copy.deepcopy(reference)
        if scheme == "bnb_llm_int8":
            bnb_llm_int8(model)
        else:
            quantize(model, scheme, **options)
        QuantLinear.use_kernels = kernels
        start = time.perf_counter()
        nll = block_nll(model, rows)
        QuantLinear.use_kernels = True
        diff = nll - base_nll  # paired by block: the change's noise is the spread of the per-block differences
        ppl = math.exp(nll.mean().item())
        change = 100.0 * (ppl / base - 1.0)
        stderr = 100.0 * diff.std().item() / math.sqrt(diff.numel()) if diff.numel() > 1 else None
        record = {**common, "scheme": name, "note": note, "perplexity": ppl, "fp32_perplexity": base,
                  "change_percent": change, "change_stderr_percent": stderr, "target_percent": target,
                  "seconds": round(time.perf_counter() - start, 1)}
        if target is not None:
            record["meets_target"] = change <= target
        if scheme in ("int8", "llm_int8", "nf4") and "skip" not in options:
            record["layer_relative_error"] = layer_errors(reference, scheme, **options)
        if scheme == "nf4" and "skip" not in options:
            record["bitsandbytes_max_abs_difference"] = bnb_nf4_difference(reference)
        emit(out, record)
        del model


def section_outliers(args, out: Path) -> None:
    """LLM.int8's outlier features on SmolLM2: per projection, the input features whose |x| reaches the threshold
    (6.0) in any of the first ``--outlier-blocks`` Brown blocks, and the largest |x| seen."""
    from deltaformer.models import LlamaForCausalLM
    from deltaformer.quant.layers import OUTLIER_THRESHOLD
    from deltaformer.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m")
    rows = brown_blocks(tokenizer, args.outlier_blocks, 256)
    model = LlamaForCausalLM.from_pretrained("smollm2-135m").eval()
    seen: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()
            entry = seen.setdefault(name, {"features": torch.zeros(x.shape[1], dtype=torch.bool), "max": 0.0})
            entry["features"] |= (x >= OUTLIER_THRESHOLD).any(dim=0)
            entry["max"] = max(entry["max"], float(x.max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _plain_linears(model)]
    # query / key / value run as one product on their concatenated weights (their modules are not called):
    # their shared input is the attention module's
    handles += [m.register_forward_hook(hook(n + ".query/key/value")) for n, m in model.named_modules()
                if n.endswith(".attn")]
    block_nll(model, rows)
    for h in handles:
        h.remove()
    per_kind: dict[str, dict[str, Any]] = {}
    for name, entry in seen.items():
        kind = per_kind.setdefault(name.rsplit(".", 1)[-1], {"layers": 0, "layers_with_outliers": 0,
                                                             "most_outlier_features": 0, "largest_abs_input": 0.0})
        count = int(entry["features"].sum())
        kind["layers"] += 1
        kind["layers_with_outliers"] += int(count > 0)
        kind["most_outlier_features"] = max(kind["most_outlier_features"], count)
        kind["largest_abs_input"] = round(max(kind["largest_abs_input"], entry["max"]), 3)
    emit(out, {"section": "outliers", "model": "smollm2-135m (Q4_1 GGUF, dequantized)", "threshold": OUTLIER_THRESHOLD,
               "text": f"Brown documents 0, 25, 50, ...: the first {rows.shape[0]} blocks of 256 tokens",
               "tokens": rows.numel(), "per_projection": dict(sorted(per_kind.items()))})


# --- bytes per weight -----------------------------------------------------------------------------------

#: Schemes whose storage the bytes section measures: (name, quantize() options).
BYTES_SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("int8", {"scheme": "int8", "granularity": "channel"}),
    ("int8 per group of 64", {"scheme": "int8", "granularity": "group", "group_size": 64}),
    ("llm.int8", {"scheme": "llm_int8"}), ("w8a8", {"scheme": "w8a8"}),
    ("nf4 + double quantization", {"scheme": "nf4", "blocksize": 64, "double_quant": True}),
    ("nf4", {"scheme": "nf4", "blocksize": 64, "double_quant": False}),
    ("fp4 + double quantization", {"scheme": "fp4", "blocksize": 64, "double_quant": True}),
    ("int4 (groups of 32)", {"scheme": "int4", "blocksize": 32}),
]


def section_bytes(args, out: Path) -> None:
    """Bytes per weight of each scheme from the buffers of quantized SmolLM2 (its block linears: 30 x 7)."""
    import copy

    from deltaformer.models import LlamaForCausalLM
    from deltaformer.quant.layers import QuantLinear, quantize

    reference = LlamaForCausalLM.from_pretrained("smollm2-135m")
    records = {}
    for name, options in BYTES_SCHEMES:
        model = quantize(copy.deepcopy(reference), **options)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        weights = sum(m.out_features * m.in_features for m in layers)
        stored = sum({t.data_ptr(): t.numel() * t.element_size() for m in layers for t in m.buffers()}.values())
        records[name] = {"section": "bytes", "model": "smollm2-135m", "scheme": name, "settings": options,
                         "layers": len(layers), "weights": weights, "bytes": stored,
                         "bytes_per_weight": stored / weights, "bits_per_weight": 8 * stored / weights,
                         "fp32_bytes_per_weight": 4.0}
        del model
    double, plain = records["nf4 + double quantization"], records["nf4"]
    double["double_quant_saving_bits_per_weight"] = plain["bits_per_weight"] - double["bits_per_weight"]
    for record in records.values():
        emit(out, record)


# --- rt-polarity accuracy -------------------------------------------------------------------------------

def subsets(args, work: Path) -> dict[str, Path]:
    """rt-polarity's fixed splits cut to the first ``--train``, ``--validation`` and ``--test`` examples (JSONL)."""
    from deltaformer.data.tasks import load_task

    task = load_task("rt-polarity")
    files = {}
    for split, n in (("train", args.train), ("validation", args.validation), ("test", args.test)):
        path = work / f"{split}.jsonl"
        rows = [{"text": e.text, "label": e.label} for e in task.split(split)[:n]]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files[split] = path
    return files


def finetune_run(directory: Path, method: str, seed: int, args, files: dict[str, Path]) -> dict[str, Any]:
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import DEFAULT_LR, MethodSpec
    from deltaformer.train.trainer import TrainConfig

    spec = FinetuneSpec(model="minilm", out=directory, method=MethodSpec(method, dict(LORA)),
                        train_file=files["train"], validation_file=files["validation"], test_file=files["test"],
                        max_length=args.max_length, overwrite=True,
                        train=TrainConfig(epochs=args.epochs, batch_size=32, lr=DEFAULT_LR["lora"], seed=seed,
                                          progress=False, device="cpu"))
    return finetune(spec)


LORA = {"targets": ["query", "value"]}  # the LoRA fine-tuning defaults otherwise (r=16, alpha=32, dropout 0.1)


def settings(args) -> dict[str, Any]:
    return {"task": "rt-polarity", "model": "minilm", "subset": f"first {args.train} train, {args.validation} "
            f"validation, {args.test} test examples of the fixed splits", "epochs": args.epochs,
            "max_length": args.max_length, "batch_size": 32, "lora": "r=16 alpha=32 dropout=0.1 on query,value"}


#: The accuracy section's schemes: ``quant.layers.quantize`` arguments (each run's classifier head stays fp32).
ACCURACY_SCHEMES: dict[str, dict[str, Any]] = {
    "int8": {"scheme": "int8", "granularity": "channel"}, "llm.int8": {"scheme": "llm_int8"},
    "nf4": {"scheme": "nf4", "blocksize": 64, "double_quant": True}, "w8a8": {"scheme": "w8a8"}}
TARGET_ACC = {"int8": 0.5, "llm.int8": 0.5, "nf4": 1.0, "w8a8": 0.5}


def predictions(model, directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and gold labels of the run's test file (the run's tokenizer, max length and label map)."""
    from deltaformer.data.collate import PadCollator, encode_examples
    from deltaformer.data.tabular import Fields, read_table
    from deltaformer.train.runs import read_labels, read_run_info

    info, labels = read_run_info(directory), read_labels(directory)
    from deltaformer.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info["base_model"])
    test = read_table(Path(info["data"]["test"]), Fields(**info["data"]["fields"])).examples
    encoded = encode_examples(tokenizer, test, int(info["max_length"]), labels)
    collate = PadCollator(tokenizer.pad_token_id or 0)
    preds, gold = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), 64):
            batch = collate(encoded[start:start + 64])
            gold.append(batch.pop("labels"))
            preds.append(model(**batch).logits.argmax(-1))
    return torch.cat(preds), torch.cat(gold)


def section_accuracy(args, out: Path, work: Path) -> None:
    """MiniLM fully fine-tuned on rt-polarity (fp32), then every linear layer but its classifier quantized."""
    from deltaformer.quant.layers import quantize
    from deltaformer.train.finetune import FinetuneSpec, finetune
    from deltaformer.train.methods import DEFAULT_LR, MethodSpec
    from deltaformer.train.runs import load_run
    from deltaformer.train.trainer import TrainConfig

    run = work / "full-0"
    files = subsets(args, work)
    spec = FinetuneSpec(model="minilm", out=run, method=MethodSpec("full"), train_file=files["train"],
                        validation_file=files["validation"], test_file=files["test"], max_length=args.max_length,
                        overwrite=True, train=TrainConfig(epochs=args.epochs, batch_size=32, lr=DEFAULT_LR["full"],
                                                          seed=0, progress=False, device="cpu"))
    torch.manual_seed(0)
    results = finetune(spec)
    fp32_preds, gold = predictions(load_run(run).model, run)
    fp32 = float((fp32_preds == gold).float().mean())
    common = {"section": "accuracy", **settings(args), "method": "full fine-tuning (lr 5e-5, seed 0)",
              "lora": None, "quantized": "every linear layer but the classifier head (quantize's default skip)"}
    emit(out, {**common, "scheme": "fp32", "test_accuracy": fp32, "results_accuracy": results["test"]["accuracy"],
               "train_seconds": results.get("train_seconds")})
    for name, options in ACCURACY_SCHEMES.items():
        model = quantize(load_run(run).model, **options)
        start = time.perf_counter()
        preds, _ = predictions(model, run)
        acc = float((preds == gold).float().mean())
        change = 100.0 * (acc - fp32)
        emit(out, {**common, "scheme": name, "settings": options, "test_accuracy": acc, "fp32_accuracy": fp32,
                   "change_points": change, "flipped_predictions": int((preds != fp32_preds).sum()),
                   "test_examples": int(gold.numel()), "target_points": TARGET_ACC[name],
                   "meets_target": abs(change) <= TARGET_ACC[name], "seconds": round(time.perf_counter() - start, 1)})
        del model


def section_qlora(args, out: Path, work: Path) -> None:
    """LoRA and QLoRA from the same seeds (same data order, same LoRA and head initialisation), in alternation;
    then, to see where a gap comes from, the NF4 error of MiniLM's weights and the QLoRA delta on the fp32 base."""
    accs: dict[str, list[float]] = {"lora": [], "qlora": []}
    files = subsets(args, work)
    from deltaformer.data.tasks import load_task

    task = load_task("rt-polarity")
    sizes = {split: sum(1 for _ in open(path, encoding="utf-8")) for split, path in files.items()}
    subset = ", ".join(f"first {sizes[s]} of {len(task.split(s))} {s}" for s in ("train", "validation", "test"))
    common = {"section": "qlora", **settings(args), "qlora": "the same LoRA on an NF4 base with double quantization",
              "subset": f"{subset} examples of the fixed splits", "threads": torch.get_num_threads()}
    for seed in range(args.seeds):
        for method in ("lora", "qlora"):
            run = work / f"qlora-section-{method}-{seed}"
            results = finetune_run(run, method, seed, args, files)
            accs[method].append(results["test"]["accuracy"])
            emit(out, {**common, "method": method, "seed": seed, "test_accuracy": results["test"]["accuracy"],
                       "train_seconds": results.get("train_seconds"), "quantize": results.get("quantize")})
    lora, qlora = statistics.mean(accs["lora"]), statistics.mean(accs["qlora"])
    diffs = [100.0 * (q - f) for q, f in zip(accs["qlora"], accs["lora"])]
    sd = statistics.stdev if args.seeds > 1 else (lambda xs: 0.0)
    emit(out, {**common, "summary": True, "seeds": args.seeds,
               "lora_runs": accs["lora"], "qlora_runs": accs["qlora"],
               "lora_mean": lora, "lora_sd": sd(accs["lora"]), "qlora_mean": qlora, "qlora_sd": sd(accs["qlora"]),
               "difference_points": 100.0 * (qlora - lora), "paired_differences_points": diffs,
               "paired_difference_sd_points": sd(diffs),
               "test_accuracy_standard_error_points": 100.0 * math.sqrt(lora * (1 - lora) / sizes["test"]),
               "target_points": 1.0, "meets_target": abs(100.0 * (qlora - lora)) <= 1.0})
    emit(out, {**common, "diagnosis": True, **nf4_error("minilm"), "qlora_delta_on_fp32_base": [
        on_fp32_base(work / f"qlora-section-qlora-{seed}") for seed in range(args.seeds)]})


def on_fp32_base(directory: Path) -> float:
    """Test accuracy of a QLoRA run's delta and head on the fp32 base (the same LoRA, base unquantized)."""
    from deltaformer.checkpoints.io import load_state_dict
    from deltaformer.data.collate import PadCollator, encode_examples
    from deltaformer.data.tabular import Fields, read_table
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.evaluation import evaluate
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.runs import build_classifier, read_labels, read_run_info, trainable_state

    info = read_run_info(directory)
    labels = read_labels(directory)
    options = {k: v for k, v in info["method_options"].items() if k != "quantize"}
    model = build_classifier(info["base_model"], labels, MethodSpec("lora", options), log_report=False)
    state = load_state_dict(directory / "model" / "trainable.safetensors")
    with torch.no_grad():
        for name, tensor in trainable_state(model).items():
            tensor.copy_(state[name])
    tokenizer = AutoTokenizer.from_pretrained(info["base_model"])
    test = read_table(Path(info["data"]["test"]), Fields(**info["data"]["fields"])).examples
    encoded = encode_examples(tokenizer, test, int(info["max_length"]), labels)
    return evaluate(model, encoded, PadCollator(tokenizer.pad_token_id or 0), len(labels), 64)["accuracy"]


def nf4_error(name: str) -> dict[str, Any]:
    """NF4 (blocks of 64, double quantization) on every encoder linear of ``name``: the relative error of the
    weights (||W - deq(q(W))|| / ||W||), ours and bitsandbytes' CPU build, and the largest difference between the two."""
    from deltaformer.models.auto import load_model
    from deltaformer.quant.schemes import nf4

    model = load_model(name)
    ours, bnb_errors, gap = [], [], 0.0
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            deq = nf4(w, blocksize=64, double_quant=True).rows(0, w.shape[0])
            ours.append(float((w - deq).norm() / w.norm()))
            try:
                import bitsandbytes.functional as bf

                packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                ref = bf.dequantize_4bit(packed, state).to(w.dtype)
                bnb_errors.append(float((w - ref).norm() / w.norm()))
                gap = max(gap, float((ref - deq).abs().max()))
            except ImportError:
                pass
    record: dict[str, Any] = {"nf4_weight_error": {"layers": len(ours), "mean_relative": statistics.mean(ours),
                                                   "max_relative": max(ours)}}
    if bnb_errors:
        record["nf4_weight_error"].update({"bnb_mean_relative": statistics.mean(bnb_errors),
                                           "ours_vs_bnb_max_abs": gap})
    return record


# --- the training step ----------------------------------------------------------------------------------

def step_model(name: str, checkpointing: bool):
    """``name``'s model for the step (LoRA r=8 on every linear but the vocabulary projection) and its forward."""
    ids = torch.randint(3, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    if name == "bnb_qlora":
        model = bnb_model()
        if checkpointing:  # transformers' per-layer checkpointing (its loss is not chunked)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        def forward():
            return model(input_ids=ids, labels=ids).loss
        return model, forward
    from deltaformer import delta
    from deltaformer.models import LlamaForCausalLM
    from deltaformer.train.methods import quantize_base

    model = LlamaForCausalLM.from_pretrained("smollm2-135m")
    if name == "ours_qlora":
        quantize_base(model, "nf4")
    delta.attach(model, delta.LoraConfig(r=8, alpha=16.0, targets="all-linear"), "d")
    delta.freeze_base(model)
    if checkpointing:
        model.gradient_checkpointing_enable()

    def forward():
        return model(ids, labels=ids).loss
    return model, forward


def step_config(name: str, steps: int, checkpointing: bool) -> dict[str, Any]:
    """Run in a fresh subprocess: build ``name``'s model, then time ``steps`` steps after one warm-up step."""
    import ctypes
    import gc

    torch.manual_seed(0)
    baseline = rss_mark()
    model, forward = step_model(name, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    model_mb = (_rss_kib() - baseline) / 1024
    mark = rss_mark()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    peak = rss_peak_mib(mark) + (mark - baseline) / 1024
    return {"config": name, "gradient_checkpointing": checkpointing, "step_seconds": statistics.median(times),
            "steps_seconds": times, "peak_mb": peak, "model_mb": model_mb,
            "trainable": sum(p.numel() for p in params), "loss": loss.item()}


def interleaved(steps: int, checkpointing: bool) -> dict[str, Any]:
    """Both of our steps in one process, stepped in alternation: the time ratio with the load shared alike."""
    runs = {}
    for name in ("ours_lora", "ours_qlora"):
        torch.manual_seed(0)
        model, forward = step_model(name, checkpointing)
        model.train()
        runs[name] = (forward, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 1):
        for name, (forward, optimizer) in runs.items():
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            forward().backward()
            optimizer.step()
            if i:
                times[name].append(time.perf_counter() - start)
    ratios = [q / f for q, f in zip(times["ours_qlora"], times["ours_lora"])]
    return {"config": "interleaved", "gradient_checkpointing": checkpointing, "lora_seconds": times["ours_lora"],
            "qlora_seconds": times["ours_qlora"], "time_ratio": statistics.median(ratios)}


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bnb_model():
    """transformers' Llama from the same GGUF, its linears as bitsandbytes NF4 (double quantization), peft LoRA."""
    import bitsandbytes as bnb
    import peft
    import transformers
    from torch import nn

    from deltaformer.data.assets import fetch

    folder = fetch("smollm2-135m")
    gguf = next(folder.glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def section_step(args, out: Path) -> None:
    """Every config in a fresh process (its own peak), with gradient checkpointing off and then on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    allocator = "glibc malloc, default settings (freed heap memory stays in the process)"
    if args.malloc_mmap_threshold:  # every allocation above it is its own mapping, returned to the system when freed
        env.update(MALLOC_MMAP_THRESHOLD_=str(args.malloc_mmap_threshold),
                   MALLOC_TRIM_THRESHOLD_=str(args.malloc_mmap_threshold))
        allocator = f"glibc malloc, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (freed tensors go back)"
    common = {"section": "step", "model": "smollm2-135m", "lora": "r=8 alpha=16 all linear layers but the "
              "vocabulary projection", "tokens": "4 x 256", "steps_timed": args.steps, "threads": 1,
              "allocator": allocator}
    for checkpointing in [{"off": False, "on": True}[c] for c in args.checkpointing_modes.split(",")]:
        results = {}
        for name in args.step_configs.split(","):
            cmd = [sys.executable, __file__, "--step-config", name, "--steps", str(args.steps)]
            cmd += ["--checkpointing"] if checkpointing else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results[name] = {"config": name, "gradient_checkpointing": checkpointing, "error": tail[0][:300]}
            else:
                results[name] = json.loads(lines[-1])
            emit(out, {**common, **results[name]})
        if not {"ours_lora", "ours_qlora", "interleaved"} <= set(results):
            continue
        lora, ours, both = results["ours_lora"], results["ours_qlora"], results["interleaved"]
        if any("error" in r for r in (lora, ours, both)):
            continue
        summary = {**common, "summary": True, "gradient_checkpointing": checkpointing,
                   "lora_peak_mb": lora["peak_mb"], "qlora_peak_mb": ours["peak_mb"],
                   "memory_ratio": ours["peak_mb"] / lora["peak_mb"], "weights_ratio": ours["model_mb"] / lora["model_mb"],
                   "time_ratio": both["time_ratio"],
                   "time_ratio_separate_processes": ours["step_seconds"] / lora["step_seconds"],
                   "memory_target": 0.6, "time_target": 1.5}
        summary["meets_target"] = summary["memory_ratio"] <= 0.6 and summary["time_ratio"] <= 1.5
        bnb = results.get("bnb_qlora", {"error": "not run"})
        if "error" not in bnb:
            summary["bnb_time_over_ours"] = bnb["step_seconds"] / ours["step_seconds"]
            summary["bnb_memory_over_ours"] = bnb["peak_mb"] / ours["peak_mb"]
        emit(out, summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="perplexity,accuracy,qlora,step")
    p.add_argument("--out", type=Path, default=HERE / "quantization_quality_cpu.jsonl")
    p.add_argument("--blocks", type=int, default=64, help="perplexity: blocks of 256 Brown tokens")
    p.add_argument("--outlier-blocks", type=int, default=8, help="outliers: blocks of 256 Brown tokens")
    p.add_argument("--ppl-variants", default="", help="perplexity: comma-separated variant names (default all)")
    p.add_argument("--train", type=int, default=1000, help="rt-polarity: first N training examples")
    p.add_argument("--validation", type=int, default=200, help="rt-polarity: first N validation examples")
    p.add_argument("--test", type=int, default=1066, help="rt-polarity: first N test examples")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps timed (after one warm-up step)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, written to a temporary file")
    p.add_argument("--step-config", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-configs", default="ours_lora,ours_qlora,bnb_qlora,interleaved",
                   help="step: the configs to run (each in its own process)")
    p.add_argument("--checkpointing-modes", default="off,on", help="step: gradient checkpointing off, on or both")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="step: run the configs with glibc's MALLOC_MMAP_THRESHOLD_ (bytes) so freed tensors return to "
                   "the system and the peak is the step's working set (0: the allocator's defaults)")
    p.add_argument("--work", type=Path, default=None, help="directory for the fine-tuning runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.step_config:
        run = interleaved if args.step_config == "interleaved" else functools.partial(step_config, args.step_config)
        print(json.dumps(run(args.steps, args.checkpointing)), flush=True)
        return
    if args.quick:
        args.blocks, args.train, args.validation, args.test = 1, 32, 16, 16
        args.epochs, args.seeds, args.steps, args.max_length = 1, 1, 1, 32
        args.out = Path(tempfile.mkdtemp()) / "quick.jsonl"
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    if "perplexity" in sections:
        section_perplexity(args, args.out)
    if "outliers" in sections:
        section_outliers(args, args.out)
    if "bytes" in sections:
        section_bytes(args, args.out)
    if "accuracy" in sections:
        section_accuracy(args, args.out, work)
    if "qlora" in sections:
        section_qlora(args, args.out, work)
    if "step" in sections:
        section_step(args, args.out)


if __name__ == "__main__":
    main()
