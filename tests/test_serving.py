"""``deltaformer serve`` end to end: a real server on a free port of 127.0.0.1, the official ``openai`` client
and raw HTTP. The answers are checked against offline ``generate`` with the same delta, token for token."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import time

import httpx
import openai
import pytest
import torch

from deltaformer import delta
from deltaformer.config import LlamaConfig
from deltaformer.generation import GenerationConfig, generate
from deltaformer.models import LlamaForCausalLM
from deltaformer.serving.server import BackgroundServer
from deltaformer.serving.service import Service
from deltaformer.serving.settings import ServeConfig
from deltaformer.tokenizer import train_tokenizer

KEY = "test-key-123"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a delta for every user, all in one batch",
         "serving many small deltas on one frozen model", "tokens stream as server-sent events"] * 20
DELTAS = {"lora": delta.LoraConfig(r=4, targets=("query", "value")), "ia3": delta.IA3Config(),
          "adapter": delta.AdapterConfig(), "bitfit": delta.BitFitConfig()}
SERVED = [None, *DELTAS]
PROMPTS = ["the quick brown", "a delta for", "serving many small", "tokens stream", "one frozen model",
           "the lazy dog", "all in one", "every user"]


def tiny_llama(vocab: int, seed: int = 0, context: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         eos_token_id=0, bos_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a reference model with four random deltas attached, and the deltas' files under a root."""
    root = tmp_path_factory.mktemp("deltas")
    tokenizer = train_tokenizer(TEXTS, kind="bpe", vocab_size=320, min_frequency=1, lowercase=False)
    for token in ("<|im_start|>", "<|im_end|>"):
        tokenizer.backend_tokenizer.add_special_tokens([token])
    reference = tiny_llama(len(tokenizer))
    base_state = copy.deepcopy(reference.state_dict())
    for name, config in DELTAS.items():
        delta.attach(reference, config, name)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in delta.delta_parameters(reference):
            p.normal_(0, 0.3)
    for name in DELTAS:
        delta.save_delta(reference, root / name, name)
    delta.set_active(reference, None)
    return {"tokenizer": tokenizer, "reference": reference, "base_state": base_state, "root": root}


def make_service(setup, **settings) -> Service:
    model = tiny_llama(len(setup["tokenizer"]))
    model.load_state_dict(setup["base_state"])
    return serve_model(setup, model, **settings)


def serve_model(setup, model, **settings) -> Service:
    config = ServeConfig(**{"api_key": KEY, "max_batch": 4, "max_queue": 32, "max_tokens_limit": 48,
                            "delta_roots": (str(setup["root"]),), "port": 0, **settings})
    service = Service(model, setup["tokenizer"], config, "tiny", chat_template=CHATML)
    for name in DELTAS:
        service.registry.add(name, setup["root"] / name, trusted=True)
    return service


@pytest.fixture(scope="module")
def server(setup):
    with BackgroundServer(make_service(setup)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def offline(setup, ids: list[int], name: str | None, **settings) -> list[int]:
    """New token ids from ``generate`` on the reference model with the same delta."""
    config = GenerationConfig(eos_token_id=0, pad_token_id=0, **settings)
    out = generate(setup["reference"], torch.tensor([ids]), config=config, deltas=[name])
    return out[0, len(ids):].tolist()


def text_of(setup, new_ids: list[int]) -> str:
    ids = new_ids[:new_ids.index(0)] if 0 in new_ids else new_ids
    return setup["tokenizer"].decode(ids, skip_special_tokens=True)


def expected(setup, prompt: str, name: str | None, max_tokens: int) -> str:
    ids = setup["tokenizer"].encode(prompt)
    return text_of(setup, offline(setup, ids, name, max_new_tokens=max_tokens))


def model_name(name: str | None) -> str:
    return "tiny" if name is None else f"tiny:{name}"


def test_models_list_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:5] == ["tiny", "tiny:lora", "tiny:ia3", "tiny:adapter", "tiny:bitfit"]
    assert client.models.retrieve("tiny:lora").id == "tiny:lora"
    health = httpx.get(f"{server}/health").json()  # open without the key
    assert health["status"] == "ok" and health["max_batch"] == 4


@pytest.mark.parametrize("name", SERVED)
def test_greedy_completion_equals_generate(setup, client, name):
    answer = client.completions.create(model=model_name(name), prompt="the quick brown", max_tokens=12,
                                       temperature=0)
    assert answer.choices[0].text == expected(setup, "the quick brown", name, 12)
    assert answer.model == model_name(name)
    assert answer.usage.prompt_tokens == len(setup["tokenizer"].encode("the quick brown"))


def test_sixteen_concurrent_requests_over_deltas(setup, client):
    """16 requests at once over 4 deltas and the bare model (batch of 4: rows join and leave mid-decode)."""
    jobs = [(PROMPTS[i % len(PROMPTS)], SERVED[i % 5], 4 + (i * 7) % 20) for i in range(16)]
    stream_each = [i % 3 == 0 for i in range(16)]

    def ask(i: int) -> str:
        prompt, name, n = jobs[i]
        if stream_each[i]:
            chunks = client.completions.create(model=model_name(name), prompt=prompt, max_tokens=n,
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=model_name(name), prompt=prompt, max_tokens=n,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for (prompt, name, n), answer in zip(jobs, answers):
        assert answer == expected(setup, prompt, name, n), (prompt, name, n)


def test_seeded_sampling_equals_generate(setup, client):
    ids = setup["tokenizer"].encode("a delta for")
    settings = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, top_k=0, seed=1234)
    want = text_of(setup, offline(setup, ids, "lora", **settings))
    got = [client.completions.create(model="tiny:lora", prompt="a delta for", max_tokens=10, temperature=0.9,
                                     top_p=0.95, seed=1234).choices[0].text for _ in range(2)]
    assert got == [want, want]


def test_chat_plain_and_streamed(setup, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown"}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = setup["tokenizer"].encode(text + "<|im_start|>assistant\n", add_special_tokens=False)
    want = text_of(setup, offline(setup, ids, "ia3", max_new_tokens=10))
    answer = client.chat.completions.create(model="tiny:ia3", messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == want and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny:ia3", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_stop_string_cuts_the_answer(setup, client):
    full = expected(setup, "serving many small", "lora", 20)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop
    answer = client.completions.create(model="tiny:lora", prompt="serving many small", max_tokens=20,
                                       temperature=0, stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny:lora", prompt="serving many small", max_tokens=20,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_bad_requests_get_their_status_and_the_server_keeps_serving(setup, server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="tiny:nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="at most 80"):
        client.completions.create(model="tiny", prompt=[5] * 120, max_tokens=20)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[10**6], max_tokens=2)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = [(b"{not json", 400, "invalid_json"), (b"[1, 2]", 400, None),
           (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "3"}).encode(), 400, None),
           (json.dumps({"model": "tiny", "prompt": "x", "bogus": 1}).encode(), 400, None),
           (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 3}).encode(), 400, "unsupported_parameter"),
           (b'{"model": "tiny", "prompt": "' + b"x" * (2 << 20) + b'"}', 413, "body_too_large")]
    for body, status, code in raw:
        reply = httpx.post(f"{server}/v1/completions", content=body, headers=auth, timeout=30)
        assert reply.status_code == status, (body[:40], reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"] and (code is None or error["code"] == code)
    assert httpx.post(f"{server}/v1/completions", content=b"{}").status_code == 401  # no key at all
    assert httpx.get(f"{server}/v2/nothing", headers=auth).json()["error"]["type"] == "not_found_error"
    answer = client.completions.create(model="tiny:adapter", prompt="the lazy dog", max_tokens=6, temperature=0)
    assert answer.choices[0].text == expected(setup, "the lazy dog", "adapter", 6)


def test_add_and_remove_a_delta_while_running(setup, server, client, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    add = httpx.post(f"{server}/v1/deltas", json={"name": "ia3-copy", "path": "ia3"}, headers=auth)
    assert add.status_code == 201, add.text
    assert "tiny:ia3-copy" in [m.id for m in client.models.list().data]
    answer = client.completions.create(model="tiny:ia3-copy", prompt="every user", max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected(setup, "every user", "ia3", 8)
    again = httpx.post(f"{server}/v1/deltas", json={"name": "ia3-copy", "path": "ia3"}, headers=auth)
    assert again.status_code == 409
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (setup["root"] / "escape").symlink_to(outside)
    for path in (str(outside), "../", "escape", "missing"):
        reply = httpx.post(f"{server}/v1/deltas", json={"name": "x", "path": path}, headers=auth)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_path", path
    bad_name = httpx.post(f"{server}/v1/deltas", json={"name": "../x", "path": "lora"}, headers=auth)
    assert bad_name.status_code == 400
    assert httpx.post(f"{server}/v1/deltas", json={"name": "y", "path": "lora"}).status_code == 401
    assert httpx.delete(f"{server}/v1/deltas/ia3-copy", headers=auth).status_code == 200
    assert httpx.delete(f"{server}/v1/deltas/ia3-copy", headers=auth).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:ia3-copy", prompt="x", max_tokens=2)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_input_side_deltas_added_while_running(setup, server, client, method):
    """Prefix and prompt tuning (soft tokens take cache positions) through the API equal generate too."""
    reference = tiny_llama(len(setup["tokenizer"]))
    reference.load_state_dict(setup["base_state"])
    config = delta.PrefixConfig(num_virtual_tokens=3) if method == "prefix" else delta.PromptConfig(num_virtual_tokens=2)
    delta.attach(reference, config, method)
    with torch.no_grad():
        for p in delta.delta_parameters(reference):
            p.normal_(0, 0.3)
    delta.save_delta(reference, setup["root"] / f"{method}-x", method)
    ids = setup["tokenizer"].encode("every user")
    out = generate(reference, torch.tensor([ids]), config=GenerationConfig(max_new_tokens=8, eos_token_id=0,
                                                                           pad_token_id=0), deltas=[method])
    auth = {"Authorization": f"Bearer {KEY}"}
    add = httpx.post(f"{server}/v1/deltas", json={"name": method, "path": f"{method}-x"}, headers=auth)
    assert add.status_code == 201, add.text
    try:
        want = text_of(setup, out[0, len(ids):].tolist())
        mixed = [(method, "every user"), (None, "the quick brown"), ("lora", "a delta for"), (method, "every user")]

        def ask(job: tuple[str | None, str]) -> str:
            return client.completions.create(model=model_name(job[0]), prompt=job[1], max_tokens=8,
                                             temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # soft-token rows batched beside others
            answers = list(pool.map(ask, mixed))
        assert answers == [want, expected(setup, "the quick brown", None, 8), expected(setup, "a delta for", "lora", 8),
                           want]
    finally:
        httpx.delete(f"{server}/v1/deltas/{method}", headers=auth)


def test_one_slot_server_refuses_with_429_and_a_client_leaving_frees_the_slot(setup):
    """One slot, no queue, a long context: a second request while a stream runs is 429; closing the stream
    mid-way takes its sequence out of the batch (far fewer tokens than asked) and the slot takes new work."""
    service = serve_model(setup, tiny_llama(len(setup["tokenizer"]), seed=3, context=1024), max_batch=1,
                          max_queue=0, max_tokens_limit=1000)
    with BackgroundServer(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        stream = client.completions.create(model="tiny", prompt="the quick", max_tokens=1000, temperature=0,
                                           stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model="tiny", prompt="the", max_tokens=2)
        stream.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["decoding"] and time.monotonic() < deadline:
            time.sleep(0.01)
        health = httpx.get(f"{url}/health").json()
        assert health["decoding"] == 0 and health["generated_tokens"] < 900
        first = health["generated_tokens"]
        # a plain (not streamed) request whose client gives up is dropped too
        body = {"model": "tiny", "prompt": "the quick", "max_tokens": 1000, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["decoding"] and time.monotonic() < deadline:
            time.sleep(0.01)
        health = httpx.get(f"{url}/health").json()
        assert health["decoding"] == 0 and health["generated_tokens"] - first < 900
        answer = client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens >= 1


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_cli_serve_binds_localhost_and_answers(setup, tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    model = tiny_llama(len(setup["tokenizer"]))
    model.save_pretrained(tmp_path / "tiny")
    setup["tokenizer"].save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltaformer.cli.main", "serve", str(tmp_path / "tiny"),
                             "--port", str(port), "--max-tokens-limit", "32", "--delta", f"lora={setup['root'] / 'lora'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10, json={
                    "model": "tiny:lora", "prompt": "the quick", "max_tokens": 3, "temperature": 0})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer is not None and answer.status_code == 200, proc.stderr.read() if proc.poll() else answer
        assert answer.json()["model"] == "tiny:lora"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert "serving tiny, tiny:lora on http://127.0.0.1:" in out


def wait_health(url: str, key: str, value: int = 0, limit: float = 10) -> dict:
    """/health once ``key`` reads ``value`` (or the last one after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    health = httpx.get(f"{url}/health").json()
    while health[key] != value and time.monotonic() < deadline:
        time.sleep(0.01)
        health = httpx.get(f"{url}/health").json()
    return health


def test_ignore_eos_decodes_exactly_max_tokens(setup):
    """The model's end token is made the third greedy token: a plain request stops there, one with
    ignore_eos decodes all max_tokens, the same tokens generate makes with no end token."""
    model = tiny_llama(len(setup["tokenizer"]))
    model.load_state_dict(setup["base_state"])
    ids = setup["tokenizer"].encode("the quick brown")
    free = generate(model, torch.tensor([ids]), config=GenerationConfig(max_new_tokens=12, eos_token_id=[],
                                                                        pad_token_id=0))[0, len(ids):].tolist()
    end = next(i for i in range(1, 12) if free[i] not in free[:i])
    model.config.eos_token_id = free[end]
    with BackgroundServer(serve_model(setup, model)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        plain = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
        assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == end + 1
        for stream in (False, True):
            body = dict(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0,
                        extra_body={"ignore_eos": True})
            if stream:
                chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                tokens = chunks[-1].usage.completion_tokens
            else:
                answer = client.completions.create(**body)
                text, reason = answer.choices[0].text, answer.choices[0].finish_reason
                tokens = answer.usage.completion_tokens
            assert (text, reason, tokens) == (setup["tokenizer"].decode(free, skip_special_tokens=True), "length", 12)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the quick"}],
                                              max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 9 and chat.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="ignore_eos"):
            client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"ignore_eos": "yes"})


def error_of(reply: httpx.Response, status: int, kind: str, code: str | None = None) -> dict:
    """OpenAI's error JSON: exactly message, type, param and code, with this status, type and code."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and error["type"] == kind and (code is None or error["code"] == code), error
    return error


def test_limits_answer_in_openai_error_json(setup):
    """Every limit (queue, body size, max_tokens, prompt length, prompts per request, stop strings) answers
    with its status in OpenAI's error JSON, which the openai client maps to its exceptions."""
    service = serve_model(setup, tiny_llama(len(setup["tokenizer"]), seed=3, context=1024), max_batch=1,
                          max_queue=1, max_tokens_limit=900, max_prompt_tokens=64, max_body_bytes=2048)
    auth = {"Authorization": f"Bearer {KEY}"}
    with BackgroundServer(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)

        def post(body: dict | bytes, **kw) -> httpx.Response:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            return httpx.post(f"{url}/v1/completions", content=data, timeout=30,
                              headers={**auth, "Content-Type": "application/json"}, **kw)

        big = {"model": "tiny", "prompt": "x" * 3000, "max_tokens": 2}
        error_of(post(big), 413, "invalid_request_error", "body_too_large")
        chunked = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30,
                             content=(json.dumps(big).encode()[i:i + 500] for i in range(0, 3100, 500)))
        assert "content-length" not in chunked.request.headers
        error_of(chunked, 413, "invalid_request_error", "body_too_large")
        cases = [({"max_tokens": 901}, "max_tokens", "max_tokens_exceeded"),
                 ({"prompt": [5] * 65}, "prompt", "context_length_exceeded"),
                 ({"prompt": ["a", "b", "c"]}, "prompt", None),
                 ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
                 ({"max_tokens": 0}, "max_tokens", None)]
        for change, param, code in cases:
            error = error_of(post({"model": "tiny", "prompt": "the", "max_tokens": 2, **change}), 400,
                             "invalid_request_error", code)
            assert error["param"] == param, (change, error)
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt="the", max_tokens=901)
        assert caught.value.code == "max_tokens_exceeded" and caught.value.param == "max_tokens"
        # one decoding, one waiting: the third is 429 (with Retry-After), and the openai client says so
        running = client.completions.create(model="tiny", prompt="the quick", max_tokens=900, temperature=0,
                                            stream=True)
        next(iter(running))
        waiting = client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0, stream=True)
        assert wait_health(url, "waiting", 1)["waiting"] == 1
        busy = post({"model": "tiny", "prompt": "the", "max_tokens": 2})
        error_of(busy, 429, "rate_limit_error", "queue_full")
        assert busy.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert limited.value.code == "queue_full"
        running.close()
        text = "".join(c.choices[0].text for c in waiting)  # served once the slot is free
        assert wait_health(url, "decoding")["decoding"] == 0
    assert text == expected_tiny(service, "the", 2)


def expected_tiny(service: Service, prompt: str, max_tokens: int) -> str:
    """Greedy text of ``prompt`` on the service's own (bare) model (once its server has stopped)."""
    ids = service.tokenizer.encode(prompt)
    out = generate(service.model, torch.tensor([ids]), config=GenerationConfig(max_new_tokens=max_tokens,
                                                                               eos_token_id=0, pad_token_id=0))
    new = out[0, len(ids):].tolist()
    return service.tokenizer.decode(new[:new.index(0)] if 0 in new else new, skip_special_tokens=True)


def test_a_queued_request_whose_client_leaves_frees_its_queue_place(setup):
    """One slot, one queue place: a waiting request whose client gives up (plain or streamed) leaves the
    queue at once, without decoding, so the next request is queued instead of refused with 429."""
    service = serve_model(setup, tiny_llama(len(setup["tokenizer"]), seed=3, context=1024), max_batch=1,
                          max_queue=1, max_tokens_limit=1000)
    with BackgroundServer(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        running = client.completions.create(model="tiny", prompt="the quick", max_tokens=1000, temperature=0,
                                            stream=True)
        next(iter(running))
        body = {"model": "tiny", "prompt": "the", "max_tokens": 5, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):  # queued behind the long stream; the client stops waiting
            httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        assert wait_health(url, "waiting")["waiting"] == 0
        queued = client.completions.create(**body, stream=True)  # accepted: the place is free again
        assert httpx.get(f"{url}/health").json()["waiting"] == 1
        queued.close()  # a stream closed while it waits frees its place too
        assert wait_health(url, "waiting")["waiting"] == 0
        last = client.completions.create(**body, stream=True)
        assert wait_health(url, "waiting", 1)["waiting"] == 1
        running.close()
        text = "".join(c.choices[0].text for c in last)
        health = wait_health(url, "decoding")
        assert health["decoding"] == 0 and health["waiting"] == 0
    assert text == expected_tiny(service, "the", 5)



def test_prompt_tuning_request_joins_a_running_batch(setup, tmp_path):
    """A prompt-tuning request (soft tokens take cache positions) joins a batch that is already decoding a
    long stream, beside bare and LoRA requests joining with it; each greedy answer equals offline generate."""
    model = tiny_llama(len(setup["tokenizer"]), seed=3, context=1024)
    reference = copy.deepcopy(model)
    delta.attach(reference, delta.PromptConfig(num_virtual_tokens=3), "soft")
    delta.attach(reference, DELTAS["lora"], "lora")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in delta.delta_parameters(reference):
            p.normal_(0, 0.3)
    for name in ("soft", "lora"):
        delta.save_delta(reference, tmp_path / name, name)
    jobs = [("soft", "every user"), (None, "the quick brown"), ("lora", "a delta for"), ("soft", "one frozen model")]
    want = []
    for name, prompt in jobs:
        ids = setup["tokenizer"].encode(prompt)
        out = generate(reference, torch.tensor([ids]), deltas=[name],
                       config=GenerationConfig(max_new_tokens=8, eos_token_id=0, pad_token_id=0))
        want.append(text_of(setup, out[0, len(ids):].tolist()))
    config = ServeConfig(api_key=KEY, max_batch=4, max_queue=8, max_tokens_limit=1000, port=0)
    service = Service(model, setup["tokenizer"], config, "tiny")
    for name in ("soft", "lora"):
        service.registry.add(name, tmp_path / name, trusted=True)
    with BackgroundServer(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        running = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=1000, temperature=0,
                                            stream=True)
        next(iter(running))
        assert httpx.get(f"{url}/health").json()["decoding"] == 1

        def ask(job: tuple[str | None, str]) -> str:
            return client.completions.create(model=model_name(job[0]), prompt=job[1], max_tokens=8,
                                             temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, jobs))
        still = httpx.get(f"{url}/health").json()["decoding"]  # the long stream decoded throughout
        running.close()
    assert still == 1
    assert answers == want
