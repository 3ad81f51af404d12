"""``deltaformer serve`` under load: continuous batching over per-request deltas against one request at a
time, and against peft (one adapter per sub-batch).

SmolLM2-135M-Instruct (the Q4_1 GGUF asset, dequantized to fp32 by both libraries), 4 LoRA deltas (r=8,
query/value, B random so each changes the answers) and the bare model; ``--requests`` greedy completions of
``--tokens`` new tokens each (``ignore_eos``, so every request decodes all of them), sent by ``--clients``
concurrent clients to a real server (``deltaformer serve`` in its own process, ``--threads`` torch threads)
on 127.0.0.1, request i on model i % 5. Modes, one JSON line each:

* ``one_at_a_time``: the server with one row (``--max-batch 1``), the same load (the reference of the >= 3x
  target);
* ``batched``: the same server with ``--max-batch`` rows decoding together (rows join and leave between
  steps);
* ``one_at_a_time_mixed_methods``, ``batched_mixed_methods``: as above with two of the LoRA deltas replaced
  by prefix tuning and prompt tuning deltas (16 virtual tokens each), all in one batch;
* ``peft``: transformers + peft on the same requests without a server, grouped by adapter, each group one
  left-padded ``generate`` with ``set_adapter`` (what a server without per-sample routing must do).

Each line has total new tokens per second, p50/p95 request latency (seconds from send to full answer), the
server's decode steps and, for the batched modes, ``speedup`` over its one-at-a-time line and
``same_answers`` (greedy answers equal the one-at-a-time ones). The load is bounded (``--requests``), every
mode stops after ``--time-limit`` s, and each server is stopped when its mode ends.

``--profile DIR`` instead runs the batched load once with ``py-spy`` sampling the server process
(``DIR/serve_record.txt``: collapsed stacks of every thread, with idle frames; ``DIR/serve_dump.txt``: one
dump mid-load), for finding where a step's time goes; its timings are not results.

    python benchmarks/serve.py [--requests 32] [--clients 8] [--tokens 64] [--max-batch 8] [--threads 1]
                               [--modes lora,mixed,peft]
    python benchmarks/serve.py --quick      # 10 requests, 4 clients, 8 tokens: checks that it all runs
    python benchmarks/serve.py --profile /tmp/prof [--py-spy PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from deltaformer import delta

PROMPTS = ["Once upon a time, in a small village by the sea,", "The three most important things about",
           "Here is a short story about a robot who", "In the year 2050, cities will",
           "The recipe for a good cup of tea is", "My favourite book is about", "Dear customer, thank you for",
           "The history of the printing press begins"]


def load_ours(asset: str) -> torch.nn.Module:
    """Our model (an HF directory, or the GGUF asset through our reader), to make the deltas' files."""
    from deltaformer.models.auto import load_model

    return load_model(asset).eval()


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
    todo: asyncio.Queue[int] = asyncio.Queue()
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


def commit() -> str | None:
    """The checkout's commit (with ``+`` when it has changes), so a result line says what it measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(args: argparse.Namespace, dirs: dict[str, Path], used: list[str], max_batch: int,
           log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``deltaformer serve`` in its own process on a free port of 127.0.0.1, stopped on leaving."""
    port = free_port()
    command = [sys.executable, "-m", "deltaformer.cli.main", "serve", args.model, "--name", "smollm2",
               "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(args.requests),
               "--max-tokens-limit", str(args.tokens), "--max-prompt-tokens", "256",
               *(f"--delta={name}={dirs[name]}" for name in used)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server stopped (exit {proc.returncode}): {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not answer /health within 300 s")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                time.sleep(0.5)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def requests_for(names: list[str | None], args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"model": "smollm2" if names[i % len(names)] is None else f"smollm2:{names[i % len(names)]}",
             "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
            for i in range(args.requests)]


def serve_mode(dirs: dict[str, Path], names: list[str | None], args: argparse.Namespace, max_batch: int,
               tmp: Path) -> tuple[dict[str, Any], list[str | None]]:
    used = sorted({n for n in names if n is not None})
    with server(args, dirs, used, max_batch, tmp / "server.log") as (url, _):
        answers, latencies, wall = asyncio.run(load(url, requests_for(names, args), args.clients, args.time_limit))
        steps = httpx.get(f"{url}/health", timeout=5).json()["steps"]
    done = [a for a in answers if "choices" in a]
    failed = [a["error"]["message"] for a in answers if "error" in a]
    tokens = sum(a["usage"]["completion_tokens"] for a in done)
    result = summary(tokens, wall, latencies, max_batch=max_batch, decode_steps=steps, failed_requests=len(failed))
    if failed:
        result["first_error"] = failed[0]
    return result, [a["choices"][0]["text"] if "choices" in a else None for a in answers]


def profile(dirs: dict[str, Path], names: list[str | None], args: argparse.Namespace, tmp: Path) -> None:
    """The batched load once with py-spy sampling the server (see the module docstring)."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    used = sorted({n for n in names if n is not None})
    with server(args, dirs, used, args.max_batch, tmp / "server.log") as (url, proc):
        record = subprocess.Popen([args.py_spy, "record", "--pid", str(proc.pid), "--format", "raw", "--threads",
                                   "--idle", "--rate", "200", "--output", str(out / "serve_record.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def load_and_dump() -> tuple[list, list, float]:
            running = asyncio.ensure_future(load(url, requests_for(names, args), args.clients, args.time_limit))
            await asyncio.sleep(min(10.0, args.time_limit / 4))
            dump = await asyncio.create_subprocess_exec(args.py_spy, "dump", "--pid", str(proc.pid),
                                                        stdout=asyncio.subprocess.PIPE)
            (out / "serve_dump.txt").write_bytes((await dump.communicate())[0])
            return await running

        answers, _, wall = asyncio.run(load_and_dump())
        record.send_signal(signal.SIGINT)
        record.wait(timeout=60)
    tokens = sum(a["usage"]["completion_tokens"] for a in answers if "choices" in a)
    print(json.dumps({"profile": str(out), "new_tokens": tokens, "seconds": round(wall, 3)}), flush=True)


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
    for adapter, members in groups.items():
        batch = tokenizer([PROMPTS[i % len(PROMPTS)] for i in members], return_tensors="pt", padding=True)
        # every row decodes all --tokens, as the server's requests do with ignore_eos (min_new_tokens keeps
        # the end token from stopping a row; a batch runs its forwards until its last row ends either way)
        settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(**batch, **settings)
            else:
                model.set_adapter(adapter)
                out = model.generate(**batch, **settings)
        tokens += out[:, batch["input_ids"].shape[1]:].numel()
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
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and of peft (on cores shared with other jobs, threads "
                             "that wait for each other at every product slow both modes down unevenly)")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds each mode may take at most")
    parser.add_argument("--modes", default="lora,mixed,peft",
                        help="comma-separated: lora (one_at_a_time, batched), mixed (the *_mixed_methods pair), "
                             "peft (needs lora in the same run: its ratio is to batched)")
    parser.add_argument("--quick", action="store_true", help="10 requests, 4 clients, 8 tokens")
    parser.add_argument("--profile", metavar="DIR", help="profile the batched server with py-spy instead")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable for --profile")
    args = parser.parse_args()
    modes = set(args.modes.split(","))
    if not modes <= {"lora", "mixed", "peft"} or ("peft" in modes and "lora" not in modes):
        parser.error(f"--modes {args.modes}: choose from lora, mixed, peft (peft only with lora)")
    if args.quick:
        args.requests, args.clients, args.tokens, args.max_batch = 10, 4, 8, 4
    torch.set_num_threads(args.threads)
    lora = [None, "lora0", "lora1", "lora2", "lora3"]
    mixed = [None, "lora0", "lora1", "prefix", "prompt"]
    common = {"bench": "serve", "model": args.model, "requests": args.requests, "clients": args.clients,
              "tokens": args.tokens, "threads": args.threads, "device": "cpu", "commit": commit()}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = load_ours(args.model)
        dirs, refused = make_deltas(model, tmp)
        del model  # each server loads its own
        if args.profile:
            profile(dirs, lora, args, tmp)
            return
        if "lora" in modes:
            reference, ref_texts = serve_mode(dirs, lora, args, 1, tmp)
            batched, texts = serve_mode(dirs, lora, args, args.max_batch, tmp)
            batched.update(speedup=round(batched["tokens_per_s"] / reference["tokens_per_s"], 2),
                           same_answers=texts == ref_texts)
            print(json.dumps({**common, "mode": "one_at_a_time", "deltas": "4 lora + bare", **reference}),
                  flush=True)
            print(json.dumps({**common, "mode": "batched", "deltas": "4 lora + bare", **batched}), flush=True)
        mixed_line = {**common, "deltas": "2 lora + prefix + prompt + bare"}
        if refused and "mixed" in modes:
            print(json.dumps({**mixed_line, "mode": "batched_mixed_methods", "not_run": refused}), flush=True)
        elif "mixed" in modes:
            one_mixed, mixed_ref = serve_mode(dirs, mixed, args, 1, tmp)
            mixed_run, mixed_texts = serve_mode(dirs, mixed, args, args.max_batch, tmp)
            mixed_run.update(speedup=round(mixed_run["tokens_per_s"] / one_mixed["tokens_per_s"], 2),
                             same_answers=mixed_texts == mixed_ref)
            print(json.dumps({**mixed_line, "mode": "one_at_a_time_mixed_methods", **one_mixed}), flush=True)
            print(json.dumps({**mixed_line, "mode": "batched_mixed_methods", **mixed_run}), flush=True)
        if "peft" in modes:
            result = peft_mode(args.model, dirs, lora, args)
            result.update(batched_speedup_over_peft=round(batched["tokens_per_s"] / result["tokens_per_s"], 2))
            print(json.dumps({**common, "mode": "peft", "deltas": "4 lora + bare", **result}), flush=True)


if __name__ == "__main__":
    main()
