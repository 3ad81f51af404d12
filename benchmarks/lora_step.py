"""One LoRA training step, deltaformer vs peft on the same MiniLM, next to full fine-tuning of each.

Every config trains a 2-label sequence classifier (MiniLM, fp32) for one AdamW step on 32x128 random token
ids with an all-ones attention mask passed to both libraries. LoRA is r=8, alpha=16 on query/value, the
classifier head trains too (peft's ``task_type="SEQ_CLS"`` does the same). Train mode, with every dropout
rate set to 0 in both libraries so that the same arithmetic is compared (HF's dropout would also force the
slower math attention kernel on CPU and add random-mask work that says nothing about LoRA).

* Time: all configs live in one process and are stepped in alternation, so a busy neighbour slows all
  alike; each config's median over ``--repeats`` rounds is reported in seconds, and each ratio is the median
  of the per-round ratios (steps timed back to back), which drifting load disturbs far less. Process CPU
  seconds (``*_cpu_s``, ratios ``*_cpu``) are reported too: on a shared machine they track the work done.
* Memory: each config is stepped again in its own fresh subprocess. On CPU the kernel's resident-set
  high-water mark is reset (``/proc/self/clear_refs`` = 5) once the model and optimizer are built, and the
  step peak is ``VmHWM`` after three steps minus ``VmRSS`` before them: every byte a step touches
  (activations, gradients, AdamW state created on the first step, allocator slack) and nothing from loading.
  On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the steps.

Prints one JSON line: step seconds, step peak MB and trainable parameter counts per config, and the ratios
the targets are about (``peft_lora / ours_lora`` >= 1.3, ``ours_lora / ours_full`` <= 0.70, memory ours <= peft).

Where our step saves (2-core AMD EPYC, fp32). Both libraries run the same frozen GEMMs (forward and
input gradients of 36 linears, ~70% of a LoRA step in torch.profiler; SDPA ~14%, GELU/LayerNorm most of
the rest), so the lead comes from doing less of that work, and doing it on a faster kernel:

* the classifier reads only the pooler, so the last layer computes position 0 alone (models/bert.py
  ``first_token_only``, ~1/7 of the encoder's GEMMs, forward and backward);
* the query/key/value base products run as one GEMM (about 4% of an attention block);
* every linear's forward product and input gradient run on oneDNN instead of MKL's sgemm (``nn/linear.py``,
  ``benchmarks/linear.py``: ~1.13x on these shapes); this took the step from ~1.20x peft's speed to ~1.33x;
* LoRA adds ``scale * (x A^T) B^T`` with one addmm instead of peft's full-size scale and add, with ``B^T``
  made contiguous so that autograd computes its gradient as ``h^T grad`` (2.5x faster in a scratch timing than the
  ``grad^T h`` it picks for a transposed view): our LoRA step went from ~0.705 of our full step to ~0.69.

LoRA skips the weight gradients of frozen weights (checked: ``weight.requires_grad=False`` gives no dW
GEMM), about one of the three GEMM passes; attention, activations, norms and their backward stay, so the
LoRA / full ratio is bounded near (2G + O) / (3G + O + AdamW) and a faster shared GEMM moves it *up*.
The README's benchmark section has the measured figures of the last runs.

    python benchmarks/lora_step.py [--repeats 7] [--threads 2] [--no-memory] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from timing import rss_mark, rss_peak_mib
from torch import nn

CONFIGS = ("ours_lora", "peft_lora", "ours_full", "hf_full")
BATCH, SEQ, LABELS = 32, 128, 2


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall and process-CPU seconds of each callable per round (keys ``name`` and ``name_cpu``), timed in
    alternation so a busy neighbour hits all alike. CPU time stops while the process waits for a core, so
    on a shared machine it tracks the work done more closely than wall time does."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {key: [] for name in fns for key in (name, f"{name}_cpu")}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` timed in the same round: steadier than a ratio of medians when
    the machine's load drifts between rounds."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def build(kind: str, path: str) -> nn.Module:
    """The model of one config, in train mode with dropout 0, trainable parameters already chosen."""
    torch.manual_seed(0)
    if kind.startswith("ours"):
        from deltaformer import delta
        from deltaformer.models import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if kind == "ours_lora":
            delta.attach(model, delta.LoraConfig(r=8, alpha=16, targets=("query", "value")), "lora")
            delta.freeze_base(model)
        return model.train()
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        path, num_labels=LABELS, attn_implementation="sdpa", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    if kind == "peft_lora":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                                 task_type="SEQ_CLS")
        model = peft.get_peft_model(model, config)
    return model.train()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stepper(model: nn.Module, device: torch.device) -> Callable[[], float]:
    """One optimizer step on fixed random inputs (AdamW over the trainable parameters); returns the loss."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=gen).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, LABELS, (BATCH,), generator=gen).to(device)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def step_peak_mb(kind: str, path: str, device: torch.device, steps: int = 3) -> float:
    """Peak memory of ``steps`` training steps beyond what the built model and optimizer already hold."""
    step = stepper(build(kind, path), device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    mark = rss_mark()
    for _ in range(steps):
        step()
    return rss_peak_mib(mark)


def memory_in_subprocess(kind: str, args: argparse.Namespace) -> float:
    """Run :func:`step_peak_mb` in a fresh interpreter, so no config inherits another's allocator state."""
    cmd = [sys.executable, __file__, "--memory-of", kind, "--model", args.model, "--threads", str(args.threads),
           "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model directory or asset name")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-config memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--memory-of", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from deltaformer.models.base import resolve_path

    path = str(resolve_path(args.model))
    if args.memory_of:
        print(step_peak_mb(args.memory_of, path, device))
        return
    models = {kind: build(kind, path) for kind in CONFIGS}
    steps = {kind: stepper(model, device) for kind, model in models.items()}
    times = interleaved_times(steps, 2 if args.quick else args.repeats)
    seconds = {kind: statistics.median(ts) for kind, ts in times.items()}
    row: dict[str, object] = {"benchmark": "lora_step", "model": args.model, "device": str(device),
                              "threads": args.threads, "batch": BATCH, "seq": SEQ, "dropout": 0.0}
    row.update({f"{k}_s": v for k, v in seconds.items()})
    row.update({f"{k}_trainable": trainable(m) for k, m in models.items()})
    del models, steps
    gc.collect()
    if not args.no_memory:
        row.update({f"{k}_peak_mb": memory_in_subprocess(k, args) for k in CONFIGS})
        row["memory_ours_over_peft"] = row["ours_lora_peak_mb"] / row["peft_lora_peak_mb"]  # type: ignore[operator]
    row["speedup_peft_over_ours"] = paired_ratio(times, "peft_lora", "ours_lora")
    row["ours_lora_over_ours_full"] = paired_ratio(times, "ours_lora", "ours_full")
    row["peft_lora_over_hf_full"] = paired_ratio(times, "peft_lora", "hf_full")
    row["ours_full_over_hf_full"] = paired_ratio(times, "ours_full", "hf_full")
    row["speedup_peft_over_ours_cpu"] = paired_ratio(times, "peft_lora_cpu", "ours_lora_cpu")
    row["ours_lora_over_ours_full_cpu"] = paired_ratio(times, "ours_lora_cpu", "ours_full_cpu")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
