"""The server's request checks, prompt formatting and settings, without a model or a socket."""

from __future__ import annotations

import json

import pytest

from deltaformer.errors import ConfigError
from deltaformer.serving.errors import ApiError
from deltaformer.serving.prompts import chat_ids
from deltaformer.serving.schemas import ChatRequest, CompletionRequest, parse_request
from deltaformer.serving.settings import ServeConfig
from deltaformer.tokenizer import train_tokenizer


def parse(kind, **body):
    return parse_request(json.dumps(body).encode(), kind)


def refused(kind, body: bytes | dict) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as info:
        parse_request(raw, kind)
    assert info.value.status == 400
    return info.value


def test_accepts_what_the_openai_client_sends():
    request = parse(CompletionRequest, model="m:d", prompt=["a", "b"], max_tokens=5, temperature=0, top_p=0.5,
                    stop="x", seed=-3, stream=True, stream_options={"include_usage": True}, user="u",
                    logprobs=None, best_of=1, echo=False)
    assert request.prompts() == ["a", "b"] and request.stop == ["x"] and request.stream
    assert parse(CompletionRequest, model="m", prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert parse(CompletionRequest, model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    chat = parse(ChatRequest, model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert chat.messages[0].text() == "hi"


@pytest.mark.parametrize("body, where", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "tempreature": 1}, "tempreature"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
    ({"model": "m", "prompt": "x", "logprobs": 1}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
])
def test_bad_completion_fields_are_named(body, where):
    error = refused(CompletionRequest, body)
    assert where in error.message and error.body()["error"]["type"] == "invalid_request_error"


def test_bad_chat_bodies():
    assert "messages" in refused(ChatRequest, {"model": "m", "messages": []}).message
    assert "role" in refused(ChatRequest, {"model": "m", "messages": [{"role": "god", "content": "x"}]}).message
    assert "tools" in refused(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                            "tools": [{"type": "function"}]}).message
    assert refused(ChatRequest, b"{oops").code == "invalid_json"
    assert "not an object" in refused(ChatRequest, b"[]").message


def test_chat_prompts_from_the_template_and_its_errors_as_400():
    tokenizer = train_tokenizer(["hello there, user and assistant"] * 5, kind="bpe", vocab_size=280,
                                min_frequency=1, lowercase=False)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ids = chat_ids(tokenizer, template, [{"role": "user", "content": "hello"}])
    assert tokenizer.decode(ids) == "[user] hello\n"
    with pytest.raises(ApiError, match="no system role") as info:
        chat_ids(tokenizer, "{{ raise_exception('no system role') }}", [{"role": "user", "content": "x"}])
    assert info.value.status == 400
    with pytest.raises(ApiError):  # the sandbox refuses Python internals
        chat_ids(tokenizer, "{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ApiError, match="no chat template"):
        chat_ids(tokenizer, None, [{"role": "user", "content": "x"}])


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ConfigError, match="API key"):
        ServeConfig(api_key="has space")
    with pytest.raises(ConfigError, match="max_body_bytes"):
        ServeConfig(max_body_bytes=10)
    assert ServeConfig().host == "127.0.0.1"
