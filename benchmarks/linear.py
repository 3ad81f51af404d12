"""deltaformer's CPU linear (oneDNN) against ``F.linear`` (torch's default BLAS) at the models' shapes.

For each shape (rows x in -> out) it times, in one process and in alternation (interleaved medians), the
forward product with bias and the input gradient ``dY W`` of both, fp32, 2 threads, and the accuracy of
each against a float64 product. The weight gradient is not compared: the library leaves it on BLAS.
Shapes: MiniLM at 32 x 128 tokens (fused query/key/value, attention output, feed-forward up and down) and
a 768-wide Longformer layer's projection at 4096 and 16384 tokens. Prints one JSON line per shape and a
summary line (BLAS time / oneDNN time: above 1 means the library's path is faster).

    python benchmarks/linear.py [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from timing import interleaved_medians

from deltaformer.nn.linear import linear, uses_onednn

SHAPES = {
    "minilm_qkv": (4096, 384, 1152),
    "minilm_attn_out": (4096, 384, 384),
    "minilm_ffn_up": (4096, 384, 1536),
    "minilm_ffn_down": (4096, 1536, 384),
    "longformer_proj_4096": (4096, 768, 768),
    "longformer_proj_16384": (16384, 768, 768),
}


def measure(name: str, rows: int, inp: int, out: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x, grad = torch.randn(rows, inp), torch.randn(rows, out)
    w, b = torch.randn(out, inp) * inp**-0.5, torch.randn(out)
    with torch.no_grad():
        exact = F.linear(x.double(), w.double(), b.double())
        errors = {f"{lib}_max_rel_error": float((y.double() - exact).abs().max() / exact.abs().max())
                  for lib, y in (("onednn", linear(x, w, b)), ("blas", F.linear(x, w, b)))}
        fns = {"onednn_fwd_ms": lambda: linear(x, w, b), "blas_fwd_ms": lambda: F.linear(x, w, b)}
        times = interleaved_medians(fns, repeats, warmup=2)
    xg = x.clone().requires_grad_()
    fwd_ours, fwd_blas = linear(xg, w, b), F.linear(xg, w, b)  # a frozen weight: dX alone
    times.update(interleaved_medians({
        "onednn_dx_ms": lambda: torch.autograd.grad(fwd_ours, xg, grad, retain_graph=True),
        "blas_dx_ms": lambda: torch.autograd.grad(fwd_blas, xg, grad, retain_graph=True),
    }, repeats, warmup=2))
    gflop = 2 * rows * inp * out / 1e9
    row = {"benchmark": "linear", "shape": name, "rows": rows, "in": inp, "out": out, "onednn_used": uses_onednn(x, w),
           **{k: round(v, 2) for k, v in times.items()}, **errors}
    for kind in ("fwd", "dx"):
        row[f"onednn_{kind}_gflops"] = round(gflop / times[f"onednn_{kind}_ms"] * 1e3, 1)
        row[f"blas_{kind}_gflops"] = round(gflop / times[f"blas_{kind}_ms"] * 1e3, 1)
        row[f"{kind}_blas_over_onednn"] = round(times[f"blas_{kind}_ms"] / times[f"onednn_{kind}_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shape in SHAPES.items():
        rows.append(measure(name, *shape, repeats=args.repeats if shape[0] <= 4096 else max(3, args.repeats // 3)))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"summary": "linear", "threads": args.threads,
                      "median_fwd_blas_over_onednn": round(statistics.median(r["fwd_blas_over_onednn"] for r in rows), 3),
                      "median_dx_blas_over_onednn": round(statistics.median(r["dx_blas_over_onednn"] for r in rows), 3)}))


if __name__ == "__main__":
    main()
