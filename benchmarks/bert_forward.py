"""Time deltaformer's BertModel against transformers' BertModel (sdpa) on the real MiniLM weights.

Both models load the same checkpoint in one process; inputs are random token ids (no padding), fp32,
inference mode, 2 threads. Prints one JSON line per shape with median milliseconds and the ratio
(HF time / ours: above 1 means we are faster).

    python benchmarks/bert_forward.py [--model minilm] [--repeats 15] [--compile]
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import interleaved_medians


def measure(ours, hf, compiled, batch: int, seq: int, repeats: int) -> dict:
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones_like(ids)
    fns = {"hf_sdpa_ms": lambda: hf(input_ids=ids, attention_mask=mask), "ours_ms": lambda: ours(ids, mask)}
    if compiled is not None:
        fns["ours_compiled_ms"] = lambda: compiled(ids, mask)
    with torch.inference_mode():
        diff = ours(ids, mask).last_hidden_state - hf(input_ids=ids, attention_mask=mask).last_hidden_state
        row = {"benchmark": "bert_forward", "batch": batch, "seq": seq, "max_abs_diff": float(diff.abs().max())}
        row.update(interleaved_medians(fns, repeats, warmup=2))
    row["ratio_hf_over_ours"] = row["hf_sdpa_ms"] / row["ours_ms"]
    if compiled is not None:
        row["ratio_hf_over_ours_compiled"] = row["hf_sdpa_ms"] / row["ours_compiled_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="model directory or asset name")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    from deltaformer.models import BertModel
    from deltaformer.models.base import resolve_path

    path = resolve_path(args.model)
    ours = BertModel.from_pretrained(path).eval()
    hf = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    compiled = torch.compile(ours) if args.compile else None

    for batch, seq in [(32, 128), (1, 512)]:
        row = {"model": str(args.model), "threads": args.threads, **measure(ours, hf, compiled, batch, seq, repeats)}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
