"""One full fine-tuning step with the models' own dropout: deltaformer vs transformers, BERT and Longformer.

The step every real fine-tuning run takes: train mode with MiniLM's dropout rates (0.1 on hidden states
and on attention probabilities), a 2-label classifier, cross-entropy, backward, one AdamW step over all
parameters. ``bert``: MiniLM, batch 32 x 128 tokens. ``longformer``: MiniLM converted to a 4096-token
Longformer (one-sided window 256, ``deltaformer convert-long``), batch 4 x 1024 tokens with global attention
on the first token. Both libraries load the same checkpoint and get the same random token ids.

On CPU, dropout's random mask dominates such a step in torch (one number per element from a locked
generator); deltaformer draws it with :mod:`deltaformer.nn.dropout`, and with attention dropout on CPU takes
explicit scores with small blocks. ``lora_step.py`` sets every dropout to 0 to compare the rest.

Each configuration runs in a fresh subprocess: a warm-up step, then the median of ``--repeats`` steps;
peak memory is the resident-set high-water mark above the resident set before the first step (reset
through ``/proc/self/clear_refs``; on CUDA ``torch.cuda.max_memory_allocated``). Prints one JSON line per
configuration, then one line of ratios per model (transformers / ours: above 1 means ours is faster or
smaller).

    python benchmarks/train_step.py [--models bert longformer] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import rss_mark, rss_peak_mib

SHAPES = {"bert": (32, 128), "longformer": (4, 1024)}
LABELS = 2


def _model(model: str, impl: str, path: str):
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from deltaformer.models.bert import BertForSequenceClassification
        from deltaformer.models.longformer import LongformerForSequenceClassification

        cls = BertForSequenceClassification if model == "bert" else LongformerForSequenceClassification
        return cls.from_pretrained(path, num_labels=LABELS)
    import transformers

    cls = transformers.BertForSequenceClassification if model == "bert" \
        else transformers.LongformerForSequenceClassification
    return cls.from_pretrained(path, num_labels=LABELS)


def child(spec: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = _model(spec["model"], spec["impl"], spec["path"]).to(device).train()
    batch, seq = SHAPES[spec["model"]]
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=gen),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "labels": torch.randint(0, LABELS, (batch,), generator=gen)}
    if spec["model"] == "longformer":
        inputs["global_attention_mask"] = torch.zeros(batch, seq, dtype=torch.long)
        inputs["global_attention_mask"][:, 0] = 1
    inputs = {name: t.to(device) for name, t in inputs.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    mark = rss_mark()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    step()
    peak = (torch.cuda.max_memory_allocated() - allocated) / 2**20 if device.type == "cuda" \
        else rss_peak_mib(mark)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**spec, "batch": batch, "seq": seq, "dropout": model.config.hidden_dropout_prob, "step_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3), "peak_mib": round(peak, 1)}


def checkpoint(model: str, work: Path) -> str:
    """The checkpoint both libraries load: MiniLM itself, or MiniLM converted to a Longformer."""
    from deltaformer.data.assets import resolve_model_path

    if model == "bert":
        return str(resolve_model_path("minilm"))
    from deltaformer.convert import convert_bert_to_longformer

    return str(convert_bert_to_longformer("minilm", 4096, 256, work / "minilm-longformer-4096"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            path = checkpoint(model, Path(work))
            rows = {}
            for impl in ("ours", "hf"):
                spec = dict(model=model, impl=impl, path=path, repeats=args.repeats, threads=args.threads,
                            device=device)
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                      capture_output=True, text=True, check=True)
                rows[impl] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps({k: v for k, v in rows[impl].items() if k != "path"}), flush=True)
            print(json.dumps({"ratios": model, "time_hf_over_ours": round(rows["hf"]["step_s"] / rows["ours"]["step_s"], 2),
                              "memory_hf_over_ours": round(rows["hf"]["peak_mib"] / rows["ours"]["peak_mib"], 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
