"""Time and memory of one Longformer self-attention layer: deltaformer vs transformers vs dense SDPA.

Every implementation runs the same work with the same weights: query/key/value projections, sliding-window
attention (one-sided window 256, i.e. ``attention_window=512`` in Hugging Face terms) with one global token
(position 0, with its own global projections), and the output projection (transformers'
``LongformerSelfAttention`` leaves that to ``LongformerSelfOutput``, so the same ``nn.Linear`` is applied
after it). Hidden 768, 12 heads, batch 1, fp32, 2 threads.

* ``ours``: :class:`deltaformer.nn.sliding.LongformerSelfAttention` (``ours_dilated``: dilation 2 on the
  same 256 keys per side, which should cost the same);
* ``hf``: ``transformers``' ``LongformerSelfAttention`` + the output projection;
* ``dense``: the same projections and ``scaled_dot_product_attention`` with a dense (S x S) band mask
  (only at 4096 tokens: at 16384 the mask and scores do not fit a laptop-sized budget).

Each configuration runs in a fresh subprocess. Time: median of ``--repeats`` runs after a warm-up.
``projections_ms`` (ours, forward): the query/key/value/output projections alone, the part of the layer
no attention kernel can save. Faults: ``faulted_mib_per_call`` is the memory the kernel had to map in (minor page faults) per timed run:
fresh pages are costly on some machines, and allocations over glibc's 32 MB mmap threshold get fresh pages
every call. Peak memory: the resident-set high-water mark (``VmHWM``) of that subprocess during the first run, minus its
resident set just before (reset through ``/proc/self/clear_refs``), so it counts what torch's CPU allocator
really touched, which ``tracemalloc`` cannot see. Prints one JSON line per configuration, then one line of
ratios (hf / ours: above 1 means ours is faster or smaller).

    python benchmarks/long_attention.py [--quick] [--repeats 5] [--block N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from timing import rss_mark, rss_peak_mib

HIDDEN, HEADS, WINDOW = 768, 12, 256


def _build(impl: str, seq: int, block: int | None):
    """The layer as a callable ``x -> output`` and the input."""
    import torch

    from deltaformer.nn.sliding import GlobalTokens, LongformerMask, LongformerSelfAttention

    torch.manual_seed(0)
    dilation = 2 if impl == "ours_dilated" else 1
    ours = LongformerSelfAttention(HIDDEN, HEADS, window=WINDOW, dilation=dilation, block=block)
    x = torch.randn(1, seq, HIDDEN)
    is_global = torch.zeros(1, seq, dtype=torch.long)
    is_global[0, 0] = 1
    if impl.startswith("ours"):
        return lambda x: ours(x, LongformerMask(None, GlobalTokens.from_mask(is_global)))[0], x, [ours]
    if impl == "hf":
        import transformers
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFAttention

        config = transformers.LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                               attention_window=[2 * WINDOW], num_hidden_layers=1,
                                               attention_probs_dropout_prob=0.0)
        hf = HFAttention(config, layer_id=0)
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            getattr(hf, name).load_state_dict(getattr(ours, name).state_dict())
        mask = torch.zeros(1, seq)
        mask[0, 0] = torch.finfo(torch.float32).max  # HF's encoding: > 0 global, < 0 padding
        flags = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                     is_global_attn=True)
        return lambda x: ours.out(hf(x, **flags)[0]), x, [hf, ours.out]
    if impl == "dense":
        import torch.nn.functional as F

        positions = torch.arange(seq)
        band = (positions[:, None] - positions[None, :]).abs() <= WINDOW
        band[:, 0] = True  # everyone sees the global token

        def dense(x):
            q, k, v = (p(x).view(1, seq, HEADS, -1).transpose(1, 2) for p in (ours.query, ours.key, ours.value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(1, 2).reshape(1, seq, HIDDEN)
            g = ours.query_global(x[:, :1]).view(1, 1, HEADS, -1).transpose(1, 2)  # the global row
            kg, vg = (p(x).view(1, seq, HEADS, -1).transpose(1, 2) for p in (ours.key_global, ours.value_global))
            row = F.scaled_dot_product_attention(g, kg, vg).transpose(1, 2).reshape(1, 1, HIDDEN)
            return ours.out(torch.cat([row, out[:, 1:]], dim=1))

        return dense, x, [ours]
    raise ValueError(impl)


def child(spec: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    layer, x, modules = _build(spec["impl"], spec["seq"], spec.get("block"))
    backward = spec["mode"] == "fwd+bwd"
    params = [p for m in modules for p in m.parameters()]

    def step():
        if backward:
            for p in params:
                p.grad = None
            inp = x.detach().requires_grad_()
            layer(inp).sum().backward()
        else:
            with torch.no_grad():
                layer(x)

    mark = rss_mark()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak_mib = rss_peak_mib(mark)
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    extra = {}
    if spec["impl"] == "ours" and not backward:  # the floor every implementation shares: four projections
        projections = [getattr(modules[0], name) for name in ("query", "key", "value", "out")]
        spans = []
        with torch.no_grad():
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                for proj in projections:
                    proj(x)
                spans.append(time.perf_counter() - start)
        extra["projections_ms"] = round(statistics.median(spans) * 1000, 1)
    return {**spec, **extra, "median_ms": round(statistics.median(times) * 1000, 1),
            "min_ms": round(min(times) * 1000, 1), "first_ms": round(first * 1000, 1),
            "peak_mib": round(peak_mib, 1), "memory": "VmHWM above VmRSS before the first run",
            "faulted_mib_per_call": round(faults / max(spec["repeats"], 1) * resource.getpagesize() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096 tokens only, 2 repeats, no dense")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=None, help="queries per kernel block (ours)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    seqs = [4096] if args.quick else [4096, 16384]
    repeats = 2 if args.quick else args.repeats
    rows: dict[tuple[str, int, str], dict] = {}
    for seq in seqs:
        for mode in ("fwd", "fwd+bwd"):
            for impl in ("ours", "ours_dilated", "hf") + (("dense",) if seq <= 4096 and not args.quick else ()):
                spec = dict(impl=impl, seq=seq, mode=mode, repeats=repeats, threads=args.threads, block=args.block,
                            window=WINDOW, hidden=HIDDEN, heads=HEADS, batch=1, dtype="float32")
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                      capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows[(impl, seq, mode)] = row
                print(json.dumps(row), flush=True)
    for seq in seqs:
        for mode in ("fwd", "fwd+bwd"):
            ours, hf = rows[("ours", seq, mode)], rows[("hf", seq, mode)]
            ratio = {"ratios": f"{mode} @ {seq}", "time_hf_over_ours": round(hf["median_ms"] / ours["median_ms"], 2),
                     "memory_hf_over_ours": round(hf["peak_mib"] / max(ours["peak_mib"], 1e-9), 2),
                     "time_dilated_over_undilated":
                         round(rows[("ours_dilated", seq, mode)]["median_ms"] / ours["median_ms"], 2)}
            if ("dense", seq, mode) in rows:
                ratio["time_dense_over_ours"] = round(rows[("dense", seq, mode)]["median_ms"] / ours["median_ms"], 2)
            if seq != seqs[0]:
                ratio[f"time_ours_{seq}_over_{seqs[0]}"] = round(
                    ours["median_ms"] / rows[("ours", seqs[0], mode)]["median_ms"], 2)
            print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
