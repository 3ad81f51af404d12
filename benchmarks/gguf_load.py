"""Loading a GGUF file: time and peak memory of ours (fp32, and packed) against ``transformers``' GGUF loader.

Every measurement runs in a fresh Python process that first imports what its loader needs (torch, deltaformer,
and ``transformers`` for the reference), resets the kernel's resident-set high-water mark (benchmarks/timing.py)
and then loads the file once: ``load_s`` is wall time, ``cpu_s`` the process's CPU time, ``peak_mib`` how far
the resident set rose above what the process held before the load (``peak_total_mib``: the whole process).
The modes run in alternation, ``--repeats`` times each; each JSON line gives the medians of one mode:

* ``ours_fp32``: ``LlamaForCausalLM.from_pretrained(FILE)``, dequantized to fp32 (target: peak at most the fp32
  model plus its largest tensor, ``fp32_limit_mib``);
* ``ours_packed``: ``from_pretrained(FILE, keep_packed=True)``, linears and the token table left in the file's
  blocks (target: peak at most 1.3x the file size, ``packed_limit_mib``);
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME, dtype=torch.float32)``;
* ``header_ours`` / ``header_gguf_reader``: parsing the header (metadata + tensor directory) alone, with our
  parser and with ``gguf.GGUFReader``.

A last line (``summary``) holds the ratios and whether the targets hold.

    python benchmarks/gguf_load.py [--model smollm2-135m] [--repeats 3] [--out benchmarks/gguf_load_cpu.jsonl]
    python benchmarks/gguf_load.py --quick     # one repeat, no transformers: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("ours_fp32", "ours_packed", "transformers", "header_ours", "header_gguf_reader")


def child(mode: str, path: Path) -> dict[str, Any]:
    """Load ``path`` once in ``mode`` (in this fresh process) and measure it."""
    import torch
    from timing import rss_mark, rss_peak_mib

    from deltaformer.checkpoints.gguf import parse_header
    from deltaformer.models import LlamaForCausalLM

    load: Any
    if mode == "transformers":
        import transformers

        def load() -> Any:
            return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                     dtype=torch.float32)
    elif mode == "header_gguf_reader":
        from gguf import GGUFReader

        def load() -> Any:
            return GGUFReader(path)
    elif mode == "header_ours":
        def load() -> Any:
            return parse_header(path)
    else:
        def load() -> Any:
            return LlamaForCausalLM.from_pretrained(path, keep_packed=mode == "ours_packed")
    mark = rss_mark()
    start, cpu = time.perf_counter(), time.process_time()
    result = load()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = rss_peak_mib(mark)
    out = {"load_s": seconds, "cpu_s": cpu_seconds, "peak_mib": peak, "peak_total_mib": peak + mark / 1024}
    if mode.startswith("ours") or mode == "transformers":
        out["parameters"] = sum(p.numel() for p in result.parameters())
    return out


def run_child(mode: str, path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="asset name or GGUF file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return

    import torch

    from deltaformer.checkpoints.gguf import GGUFCheckpoint, find_gguf
    from deltaformer.models.base import resolve_path

    path = find_gguf(resolve_path(args.model))
    if path is None:
        raise SystemExit(f"{args.model} is not a GGUF file")
    checkpoint = GGUFCheckpoint(path)
    infos = checkpoint.tensor_infos().values()
    fp32_mib = sum(4 * math.prod(t.shape) for t in infos) / 2**20
    largest_mib = max(4 * math.prod(t.shape) for t in infos) / 2**20
    file_mib = path.stat().st_size / 2**20
    modes = [m for m in MODES if not (args.quick and m == "transformers")]
    repeats = 1 if args.quick else args.repeats
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            runs[mode].append(run_child(mode, path))
    common = {"model": args.model, "file": path.name, "file_mib": round(file_mib, 1), "repeats": repeats,
              "threads": torch.get_num_threads(), "types": checkpoint.type_counts()}
    lines = []
    medians: dict[str, dict[str, float]] = {}
    for mode, results in runs.items():
        keys = ("load_s", "cpu_s", "peak_mib", "peak_total_mib")
        medians[mode] = {key: statistics.median(r[key] for r in results) for key in keys}
        line = {"benchmark": "gguf_load", "mode": mode, **common,
                **{k: round(v, 3) for k, v in medians[mode].items()},
                "runs_load_s": [round(r["load_s"], 3) for r in results],
                "runs_peak_mib": [round(r["peak_mib"], 1) for r in results]}
        if "parameters" in results[0]:
            line["parameters"] = results[0]["parameters"]
        lines.append(line)
    fp32_limit, packed_limit = fp32_mib + largest_mib, 1.3 * file_mib
    summary: dict[str, Any] = {
        "benchmark": "gguf_load", "mode": "summary", **common, "fp32_model_mib": round(fp32_mib, 1),
        "largest_tensor_mib": round(largest_mib, 1), "fp32_limit_mib": round(fp32_limit, 1),
        "packed_limit_mib": round(packed_limit, 1),
        "fp32_within_limit": medians["ours_fp32"]["peak_mib"] <= fp32_limit,
        "packed_within_limit": medians["ours_packed"]["peak_mib"] <= packed_limit,
        "header_speedup_vs_gguf_reader": round(medians["header_gguf_reader"]["load_s"]
                                               / medians["header_ours"]["load_s"], 1),
    }
    if "transformers" in medians:
        ref = medians["transformers"]
        summary.update({
            "fp32_load_speedup_vs_transformers": round(ref["load_s"] / medians["ours_fp32"]["load_s"], 2),
            "fp32_peak_ratio_vs_transformers": round(medians["ours_fp32"]["peak_mib"] / ref["peak_mib"], 3),
            "packed_peak_ratio_vs_transformers": round(medians["ours_packed"]["peak_mib"] / ref["peak_mib"], 3),
        })
    lines.append(summary)
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
