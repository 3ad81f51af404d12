"""Quality of quantized bases, and the QLoRA training step: what quantizing costs, measured on this CPU.

Sections (each appends JSON lines to ``--out``, default ``benchmarks/quantization_quality_cpu.jsonl``):

* ``perplexity``: SmolLM2-135M next-token perplexity on held-out Brown text. The reference is the fp32 model
  whose weights are the GGUF file's Q4_1 blocks dequantized; every linear layer but the (tied) vocabulary
  projection is then quantized with int8 (absmax per output channel), LLM.int8 and NF4 with double
  quantization. Targets: int8 / LLM.int8 within +0.5%, NF4 within +5%.
* ``accuracy``: MiniLM fine-tuned with LoRA on rt-polarity (fp32 base), then the same run's delta and head on
  its base quantized with int8 and NF4: test accuracy within 0.5 point (int8) and 1 point (NF4).
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
SCHEMES = ("int8", "llm.int8", "nf4")
TARGET_PPL = {"int8": 0.5, "llm.int8": 0.5, "nf4": 5.0}
TARGET_ACC = {"int8": 0.5, "nf4": 1.0}


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
    return torch.tensor(ids[:blocks * length]).view(blocks, length)


def perplexity(model, rows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            logits = model(row[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(nll / count)


def section_perplexity(args, out: Path) -> None:
    import copy

    from deltaformer.models import LlamaForCausalLM
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.methods import quantize_base

    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m")
    rows = brown_blocks(tokenizer, args.blocks, 256)
    reference = LlamaForCausalLM.from_pretrained("smollm2-135m")
    start = time.perf_counter()
    base = perplexity(reference, rows)
    common = {"section": "perplexity", "model": "smollm2-135m (Q4_1 GGUF, dequantized = fp32 reference)",
              "text": f"Brown documents 0, 25, 50, ...: {rows.shape[0]} blocks of {rows.shape[1]} tokens",
              "tokens": rows.numel()}
    emit(out, {**common, "scheme": "fp32", "perplexity": base, "seconds": round(time.perf_counter() - start, 1)})
    for scheme in SCHEMES:
        model = quantize_base(copy.deepcopy(reference), scheme)
        start = time.perf_counter()
        ppl = perplexity(model, rows)
        change = 100.0 * (ppl / base - 1.0)
        emit(out, {**common, "scheme": scheme, "perplexity": ppl, "fp32_perplexity": base,
                   "change_percent": change, "target_percent": TARGET_PPL[scheme],
                   "meets_target": change <= TARGET_PPL[scheme], "seconds": round(time.perf_counter() - start, 1)})
        del model


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


def quantized_accuracy(directory: Path, quantize: str) -> float:
    """The run's delta and head on its base quantized with ``quantize``, scored on the run's test file."""
    from deltaformer.checkpoints.io import load_state_dict
    from deltaformer.data.collate import PadCollator, encode_examples
    from deltaformer.data.tabular import Fields, read_table
    from deltaformer.tokenizer import AutoTokenizer
    from deltaformer.train.evaluation import evaluate
    from deltaformer.train.methods import MethodSpec
    from deltaformer.train.runs import build_classifier, read_labels, read_run_info, trainable_state

    info = read_run_info(directory)
    labels = read_labels(directory)
    spec = MethodSpec(info["method"], {**info["method_options"], "quantize": quantize})
    model = build_classifier(info["base_model"], labels, spec, log_report=False)
    state = load_state_dict(directory / "model" / "trainable.safetensors")
    with torch.no_grad():
        for name, tensor in trainable_state(model).items():
            tensor.copy_(state[name])
    tokenizer = AutoTokenizer.from_pretrained(info["base_model"])
    test = read_table(Path(info["data"]["test"]), Fields(**info["data"]["fields"])).examples
    encoded = encode_examples(tokenizer, test, int(info["max_length"]), labels)
    return evaluate(model, encoded, PadCollator(tokenizer.pad_token_id or 0), len(labels), 64)["accuracy"]


LORA = {"targets": ["query", "value"]}  # the LoRA fine-tuning defaults otherwise (r=16, alpha=32, dropout 0.1)


def settings(args) -> dict[str, Any]:
    return {"task": "rt-polarity", "model": "minilm", "subset": f"first {args.train} train, {args.validation} "
            f"validation, {args.test} test examples of the fixed splits", "epochs": args.epochs,
            "max_length": args.max_length, "batch_size": 32, "lora": "r=16 alpha=32 dropout=0.1 on query,value"}


def section_accuracy(args, out: Path, work: Path) -> None:
    run = work / "lora-0"
    results = finetune_run(run, "lora", 0, args, subsets(args, work))
    fp32 = results["test"]["accuracy"]
    common = {"section": "accuracy", **settings(args)}
    emit(out, {**common, "scheme": "fp32", "test_accuracy": fp32, "train_seconds": results.get("train_seconds")})
    for scheme in ("int8", "nf4"):
        acc = quantized_accuracy(run, scheme)
        drop = 100.0 * (fp32 - acc)
        emit(out, {**common, "scheme": scheme, "test_accuracy": acc, "fp32_accuracy": fp32, "drop_points": drop,
                   "target_points": TARGET_ACC[scheme], "meets_target": drop <= TARGET_ACC[scheme]})


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
    p.add_argument("--blocks", type=int, default=8, help="perplexity: blocks of 256 Brown tokens")
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
    if "accuracy" in sections:
        section_accuracy(args, args.out, work)
    if "qlora" in sections:
        section_qlora(args, args.out, work)
    if "step" in sections:
        section_step(args, args.out)


if __name__ == "__main__":
    main()
