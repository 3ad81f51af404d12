"""``deltaformer serve`` under load: continuous batching over per-request deltas against one request at a
time, and against peft (one adapter per sub-batch).

SmolLM2-135M-Instruct (the Q4_1 GGUF asset, dequantized to fp32 by both libraries), 4 LoRA deltas (r=8,
query/value, B random so each changes the answers) and the bare model; ``--requests`` greedy completions of
``--tokens`` new tokens each, sent by ``--clients`` concurrent clients to a real server on 127.0.0.1, request
i on model i % 5. Modes, one JSON line each:

* ``batched``: the server with ``--max-batch`` rows decoding together (rows join and leave between steps);
* ``one_at_a_time``: the same server with one row, the same load (the reference of the >= 3x target);
* ``batched_mixed_methods``: as ``batched`` with two of the LoRA deltas replaced by prefix tuning and prompt
  tuning deltas (16 virtual tokens each), all in one batch;
* ``peft``: transformers + peft on the same requests without a server, grouped by adapter, each group one
  left-padded ``generate`` with ``set_adapter`` (what a server without per-sample routing must do).

Each line has total new tokens per second, p50/p95 request latency (seconds from send to full answer) and,
for the batched modes, ``speedup`` over ``one_at_a_time`` and ``same_answers`` (greedy answers equal the
one-at-a-time ones). The load is bounded (``--requests``) and every mode stops after ``--time-limit`` s.

    python benchmarks/serve.py [--requests 32] [--clients 8] [--tokens 64] [--max-batch 8] [--threads 2]
    python benchmarks/serve.py --quick      # 10 requests, 4 clients, 8 tokens: checks that it all runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from deltaformer import delta
from deltaformer.serving.server import BackgroundServer
from deltaformer.serving.service import Service
from deltaformer.serving.settings import ServeConfig
from deltaformer.tokenizer import AutoTokenizer

PROMPTS = ["Once upon a time, in a small village by the sea,", "The three most important things about",
           "Here is a short story about a robot who", "In the year 2050, cities will",
           "The recipe for a good cup of tea is", "My favourite book is about", "Dear customer, thank you for",
           "The history of the printing press begins"]


def load_ours(asset: str) -> tuple[torch.nn.Module, Any]:
    """Our model and tokenizer (an HF directory, or the GGUF asset through our reader)."""
    from deltaformer.models.auto import load_model

    return load_model(asset).eval(), AutoTokenizer.from_pretrained(asset)


def load_hf(asset: str) -> tuple[Any, Any]:
    """transformers' model and tokenizer of the same checkpoint (its own GGUF reader for a GGUF asset)."""
    import transformers

    from deltaformer.checkpoints.gguf import find_gguf
    from deltaformer.models.base import resolve_path

    path = Path(resolve_path(asset))
    extra = {} if (path / "config.json").is_file() else {"gguf_file": find_gguf(path).name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left", **extra)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
    return model, tokenizer


def make_deltas(model: torch.nn.Module, root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Four random LoRA deltas, a prefix and a prompt delta, saved as files (then detached again); returns
    the directories and, for a method this model refuses, why."""
    torch.manual_seed(0)
    configs = {f"lora{k}": delta.LoraConfig(r=8, alpha=16, targets=("query", "value"), init=False)
               for k in range(4)}
    configs["prefix"] = delta.PrefixConfig(num_virtual_tokens=16)
    configs["prompt"] = delta.PromptConfig(num_virtual_tokens=16)
    dirs, refused = {}, {}
    for name, config in configs.items():
        try:
            delta.attach(model, config, name)
        except delta.DeltaError as exc:
            refused[name] = str(exc)
            continue
        dirs[name] = delta.save_delta(model, root / name, name)
        delta.detach(model, name)
    return dirs, refused


async def load(url: str, requests: list[dict[str, Any]], clients: int, limit: float) -> tuple[list, list, float]:
    """Send ``requests`` from ``clients`` concurrent clients; (answers, latencies, wall seconds)."""
    answers: list[Any] = [None] * len(requests)
    latencies: list[float] = [0.0] * len(requests)
    todo = asyncio.Queue()
    for i in range(len(requests)):
        todo.put_nowait(i)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=limit) as http:
            while not todo.empty():
                i = todo.get_nowait()
                start = time.perf_counter()
                reply = await http.post("/v1/completions", json=requests[i])
                answers[i] = reply.json()  # a failed request keeps OpenAI's error JSON, counted below
                latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=limit)
    return answers, latencies, time.perf_counter() - start


def serve_mode(model: torch.nn.Module, tokenizer: Any, dirs: dict[str, Path], names: list[str | None],
               args: argparse.Namespace, max_batch: int) -> tuple[dict[str, Any], list[str]]:
    settings = ServeConfig(port=0, max_batch=max_batch, max_queue=args.requests, max_tokens_limit=args.tokens,
                           max_prompt_tokens=256)
    service = Service(model, tokenizer, settings, "smollm2", max_length=512)
    used = sorted({n for n in names if n is not None})
    for name in used:
        service.registry.add(name, dirs[name], trusted=True)
    requests = [{"model": service.registry.public_name(names[i % len(names)]), "prompt": PROMPTS[i % len(PROMPTS)],
                 "max_tokens": args.tokens, "temperature": 0} for i in range(args.requests)]
    try:
        with BackgroundServer(service) as url:
            answers, latencies, wall = asyncio.run(load(url, requests, args.clients, args.time_limit))
    finally:
        for name in used:
            service.registry.remove(name)
    done = [a for a in answers if "choices" in a]
    failed = [a["error"]["message"] for a in answers if "error" in a]
    tokens = sum(a["usage"]["completion_tokens"] for a in done)
    result = summary(tokens, wall, latencies, max_batch=max_batch, failed_requests=len(failed))
    if failed:
        result["first_error"] = failed[0]
    return result, [a["choices"][0]["text"] if "choices" in a else None for a in answers]


def summary(tokens: int, wall: float, latencies: list[float], **extra: Any) -> dict[str, Any]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"new_tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(ordered), 3), "p95_s": round(p95, 3), **extra}


def peft_mode(asset: str, dirs: dict[str, Path], names: list[str | None], args: argparse.Namespace
              ) -> dict[str, Any]:
    """transformers + peft: each adapter's requests as one left-padded generate (the bare ones with the
    adapters disabled); a request's latency is the time until its group is done."""
    import peft

    base, tokenizer = load_hf(asset)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    adapters = [n for n in dict.fromkeys(names) if n is not None]
    model = peft.PeftModel.from_pretrained(base, dirs[adapters[0]], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    groups: dict[str | None, list[int]] = {}
    for i in range(args.requests):
        groups.setdefault(names[i % len(names)], []).append(i)
    latencies, tokens = [0.0] * args.requests, 0
    start = time.perf_counter()
    for name, members in groups.items():
        batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in members], return_tensors="pt", padding=True)
        settings = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(**batch, **settings)
            else:
                model.set_adapter(name)
                out = model.generate(**batch, **settings)
        new = out[:, batch["input_ids"].shape[1]:]
        for row in new.tolist():
            stop = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            tokens += stop
        for i in members:
            latencies[i] = time.perf_counter() - start
        if time.perf_counter() - start > args.time_limit:
            raise TimeoutError("peft mode passed --time-limit")
    return summary(tokens, time.perf_counter() - start, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="asset name or HF directory of a causal LM")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds each mode may take at most")
    parser.add_argument("--no-peft", action="store_true", help="skip the transformers + peft comparison")
    parser.add_argument("--quick", action="store_true", help="10 requests, 4 clients, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.clients, args.tokens, args.max_batch = 10, 4, 8, 4
    torch.set_num_threads(args.threads)
    model, tokenizer = load_ours(args.model)
    lora = [None, "lora0", "lora1", "lora2", "lora3"]
    mixed = [None, "lora0", "lora1", "prefix", "prompt"]
    common = {"bench": "serve", "model": args.model, "requests": args.requests, "clients": args.clients,
              "tokens": args.tokens, "threads": args.threads, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        dirs, refused = make_deltas(model, Path(tmp))
        reference, ref_texts = serve_mode(model, tokenizer, dirs, lora, args, max_batch=1)
        batched, texts = serve_mode(model, tokenizer, dirs, lora, args, max_batch=args.max_batch)
        batched.update(speedup=round(batched["tokens_per_s"] / reference["tokens_per_s"], 2),
                       same_answers=texts == ref_texts)
        print(json.dumps({**common, "mode": "one_at_a_time", "deltas": "4 lora + bare", **reference}), flush=True)
        print(json.dumps({**common, "mode": "batched", "deltas": "4 lora + bare", **batched}), flush=True)
        mixed_line = {**common, "deltas": "2 lora + prefix + prompt + bare"}
        if refused:
            print(json.dumps({**mixed_line, "mode": "batched_mixed_methods", "not_run": refused}), flush=True)
        else:
            one_mixed, mixed_ref = serve_mode(model, tokenizer, dirs, mixed, args, max_batch=1)
            mixed_run, mixed_texts = serve_mode(model, tokenizer, dirs, mixed, args, max_batch=args.max_batch)
            mixed_run.update(speedup=round(mixed_run["tokens_per_s"] / one_mixed["tokens_per_s"], 2),
                             same_answers=mixed_texts == mixed_ref)
            print(json.dumps({**mixed_line, "mode": "one_at_a_time_mixed_methods", **one_mixed}), flush=True)
            print(json.dumps({**mixed_line, "mode": "batched_mixed_methods", **mixed_run}), flush=True)
        if not args.no_peft:
            result = peft_mode(args.model, dirs, lora, args)
            result.update(batched_speedup_over_peft=round(batched["tokens_per_s"] / result["tokens_per_s"], 2))
            print(json.dumps({**common, "mode": "peft", "deltas": "4 lora + bare", **result}), flush=True)


if __name__ == "__main__":
    main()
