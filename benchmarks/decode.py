"""Decoding speed: ``deltaformer.generation`` against ``transformers``' ``generate``, and per-sample deltas.

SmolLM2-135M-Instruct in fp32, the same weights in both libraries (the GGUF asset loaded by our GGUF loader
and written once with ``save_pretrained``, then loaded by each), ``torch.set_num_threads(--threads)``. Every
timing is a median of ``--repeats`` interleaved runs (benchmarks/timing.py). One JSON line per measurement,
with ``loadavg``, the machine's 1-minute load when it was written (a shared machine inflates every figure):

* ``greedy_b1`` / ``greedy_b8``: greedy decoding of a ``--prompt``-token prompt (batch 1, and 8 different
  prompts of that length) for ``--new`` new tokens (eos off, so both generate all of them): new tokens/s of
  each and ``speedup`` (targets: >= 2.0 at batch 1, >= 1.5 at batch 8); ``same_ids``: our ids equal HF's;
* ``floor_b1`` / ``floor_b8``: one product of 1 (8) rows with every weight matrix the model multiplies per
  token (all linear layers and the head) and nothing else: the floor of a decoding step on this machine, the
  tokens/s it caps greedy decoding at (``ceiling_tokens_per_s``), both libraries' greedy tokens/s as a share of
  it, and ``transformers_ceiling_speedup``, the most any library could gain over ``transformers`` there (a
  2.0x target is out of reach when it is below 2);
* ``prefill``: one forward of the batch-1 prompt into an empty cache: prompt tokens/s (target >= 1.2x);
* ``lora8``: 8 prompts on 8 different LoRA deltas (r=8, query/value, B random) generated in one batch
  (``mixed``), against the same 8 prompts all on one delta (``single``; target mixed <= 1.25x single), against
  one sub-batch per delta (``per_delta``; mixed must not be slower), and peft on the same adapters (saved by
  us, loaded by ``PeftModel``): one batch with ``adapter_names`` (``peft_mixed``) and one adapter at a time
  (``peft_per_adapter``); ``same_ids``: mixed equals per_delta.

The GGUF loading peak-RSS comparison is ``benchmarks/gguf_load.py``.

    python benchmarks/decode.py [--prompt 128] [--new 128] [--lora-new N] [--repeats 5] [--threads 2]
                                [--skip-lora | --skip-speed | --floor-only]
    python benchmarks/decode.py --quick      # 16-token prompts, 8 new tokens, 1 repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from timing import interleaved_medians

from deltaformer import delta
from deltaformer.generation import generate
from deltaformer.models import LlamaForCausalLM

N_DELTAS = 8


def prompts(tokenizer: Any, length: int, batch: int) -> torch.Tensor:
    """(batch, length) ids of different real sentences, cut or repeated to ``length`` tokens."""
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
            "books were made, sold and read across Europe. ")
    rows = []
    for b in range(batch):
        ids = tokenizer.encode(f"Story {b}: " + text * (1 + length // 20))
        rows.append(ids[:length])
    return torch.tensor(rows)


def hf_greedy(model: Any, ids: torch.Tensor, new: int, **extra: Any) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, **extra)


def ours_greedy(model: Any, ids: torch.Tensor, new: int, **extra: Any) -> torch.Tensor:
    return generate(model, ids, max_new_tokens=new, eos_token_id=[], pad_token_id=0, **extra)


def speed_rows(ours: Any, hf: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for batch in (1, 8):
        ids = prompts(tokenizer, args.prompt, batch)
        with torch.inference_mode():
            same = ours_greedy(ours, ids, args.new).tolist() == hf_greedy(hf, ids, args.new).tolist()
            ms = interleaved_medians({"ours": lambda ids=ids: ours_greedy(ours, ids, args.new),
                                      "transformers": lambda ids=ids: hf_greedy(hf, ids, args.new)}, args.repeats)
        tokens = batch * args.new
        rows.append({"mode": f"greedy_b{batch}", "prompt": args.prompt, "new": args.new, "batch": batch,
                     "ours_tokens_per_s": round(tokens / ms["ours"] * 1000, 1),
                     "transformers_tokens_per_s": round(tokens / ms["transformers"] * 1000, 1),
                     "speedup": round(ms["transformers"] / ms["ours"], 3), "target": 2.0 if batch == 1 else 1.5,
                     "same_ids": same})
    ids = prompts(tokenizer, args.prompt, 1)

    def ours_prefill() -> None:
        cache = ours.new_cache(1, ids.shape[1] + 1)
        ours(ids, cache=cache, last_only=True)

    def hf_prefill() -> None:
        hf(ids, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        ms = interleaved_medians({"ours": ours_prefill, "transformers": hf_prefill}, args.repeats)
    rows.append({"mode": "prefill", "prompt": args.prompt,
                 "ours_tokens_per_s": round(args.prompt / ms["ours"] * 1000, 1),
                 "transformers_tokens_per_s": round(args.prompt / ms["transformers"] * 1000, 1),
                 "speedup": round(ms["transformers"] / ms["ours"], 3), "target": 1.2})
    return rows


def floor_row(ours: Any, batch: int, greedy: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The weight-streaming floor of one decoding step of ``batch`` rows: ``F.linear`` of ``batch`` rows with
    every weight matrix that a step multiplies (each linear layer once, the head once even when tied to the
    embedding) and nothing else; with ``greedy`` (that batch's greedy row), each library's share of the
    tokens/s the floor allows."""
    weights = {id(m.weight): m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)}
    weights[id(ours.lm_head.weight)] = ours.lm_head.weight
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights.values()}

    def one_pass() -> None:
        for w in weights.values():
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        ms = interleaved_medians({"floor": one_pass}, max(args.repeats, 5) * 4)["floor"]
    mib = sum(w.numel() * w.element_size() for w in weights.values()) / 2**20
    ceiling = batch * 1000 / ms
    row = {"mode": f"floor_b{batch}", "batch": batch, "weight_mib": round(mib, 1), "ms_per_step": round(ms, 2),
           "weight_gb_per_s": round(mib * 2**20 / ms / 1e6, 2), "ceiling_tokens_per_s": round(ceiling, 1)}
    if greedy:
        row |= {"ours_share": round(greedy["ours_tokens_per_s"] / ceiling, 3),
                "transformers_share": round(greedy["transformers_tokens_per_s"] / ceiling, 3),
                "transformers_ceiling_speedup": round(ceiling / greedy["transformers_tokens_per_s"], 3)}
    return row


def hf_checkpoint(asset: str) -> Path:
    """An HF directory holding the asset's weights, so both libraries load the same ones: the asset itself when
    it is one, else its GGUF file loaded here and written once with ``save_pretrained`` (cached)."""
    from deltaformer.models.base import resolve_path
    from deltaformer.tokenizer import AutoTokenizer

    path = Path(resolve_path(asset))
    if (path / "config.json").is_file():
        return path
    out = Path.home() / ".cache" / "deltaformer" / "bench" / f"{asset}-hf"
    if not all((out / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{asset}-") as tmp:  # complete, or not there
            LlamaForCausalLM.from_pretrained(asset).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(asset).save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            Path(tmp).rename(out)
            Path(tmp).mkdir()  # for the context manager to remove
    return out


def lora_rows(ours: Any, checkpoint: Path, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import peft
    import transformers

    torch.manual_seed(0)
    names = [f"d{k}" for k in range(N_DELTAS)]
    for name in names:
        delta.attach(ours, delta.LoraConfig(r=8, alpha=16, targets=("query", "value"), init=False), name)
    ids = prompts(tokenizer, args.prompt, N_DELTAS)
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        dirs = {n: delta.save_delta(ours, Path(tmp) / n, n) for n in names}
        base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        theirs = peft.PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(dirs[n], adapter_name=n)
        theirs.eval()

    def mixed() -> torch.Tensor:
        return ours_greedy(ours, ids, args.new, deltas=names)

    def single() -> torch.Tensor:
        return ours_greedy(ours, ids, args.new, deltas=[names[0]] * N_DELTAS)

    def per_delta() -> torch.Tensor:
        out = []
        for k, n in enumerate(names):
            delta.set_active(ours, n)
            out.append(ours_greedy(ours, ids[k:k + 1], args.new))
        return torch.cat(out)

    def peft_mixed() -> torch.Tensor:
        return hf_greedy(theirs, ids, args.new, adapter_names=names)

    def peft_per_adapter() -> torch.Tensor:
        out = []
        for k, n in enumerate(names):
            theirs.set_adapter(n)
            out.append(hf_greedy(theirs, ids[k:k + 1], args.new))
        return torch.cat(out)

    fns = {"mixed": mixed, "single": single, "per_delta": per_delta, "peft_mixed": peft_mixed,
           "peft_per_adapter": peft_per_adapter}
    with torch.inference_mode():
        same = mixed().tolist() == per_delta().tolist()
        same_peft = mixed().tolist() == peft_mixed().tolist()
        ms = interleaved_medians(fns, args.repeats)
    row = {"mode": "lora8", "prompt": args.prompt, "new": args.new, "batch": N_DELTAS,
           **{f"{k}_ms": round(v, 1) for k, v in ms.items()},
           "mixed_over_single": round(ms["mixed"] / ms["single"], 3), "target_mixed_over_single": 1.25,
           "mixed_over_per_delta": round(ms["mixed"] / ms["per_delta"], 3),
           "mixed_over_peft_mixed": round(ms["mixed"] / ms["peft_mixed"], 3),
           "same_ids": same, "same_ids_as_peft": same_peft}
    for name in names:
        delta.detach(ours, name)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="asset name or HF directory of a Llama-family LM")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=128, help="new tokens (default 128)")
    parser.add_argument("--lora-new", type=int, default=None, help="new tokens of the lora8 rows (default --new)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lora", action="store_true", help="only the speed rows")
    parser.add_argument("--skip-speed", action="store_true", help="only the lora8 row")
    parser.add_argument("--floor-only", action="store_true", help="only the floor rows (no transformers run)")
    parser.add_argument("--quick", action="store_true", help="16-token prompts, 8 new tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.prompt, args.new, args.repeats = 16, 8, 1
    torch.set_num_threads(args.threads)
    import transformers

    checkpoint = hf_checkpoint(args.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    ours = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    rows = [] if args.skip_speed or args.floor_only else speed_rows(ours, hf, tokenizer, args)
    greedy = {row["batch"]: row for row in rows if row["mode"].startswith("greedy")}
    rows += [floor_row(ours, batch, greedy.get(batch), args) for batch in (1, 8)]
    for row in rows:
        report(args, row)
    if not (args.skip_lora or args.floor_only):
        args.new = args.lora_new or args.new
        for row in lora_rows(ours, checkpoint, tokenizer, args):
            report(args, row)


def report(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """One JSON line; ``loadavg``: the machine's 1-minute load when it was measured (2 cores, shared)."""
    print(json.dumps({"benchmark": "decode", "model": args.model, "threads": args.threads, **row,
                      "repeats": args.repeats, "loadavg": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
