"""The server's settings: where it listens, who may call it, and the limits that keep one client from
starving the others. Every field is checked on construction (type and range from its metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_fields
from ..errors import ConfigError


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; the default answers this machine only, 0.0.0.0 opens it to the network"})
    port: int = field(default=8000, metadata={"min": 0, "max": 65535, "help": "TCP port (0 picks a free one)"})
    api_key: str | None = field(default=None, metadata={
        "help": "when set, every route but /health needs 'Authorization: Bearer KEY'"})
    max_batch: int = field(default=8, metadata={"min": 1, "max": 1024,
                                                "help": "sequences decoded together in one batch"})
    max_queue: int = field(default=64, metadata={
        "min": 0, "help": "requests waiting for a batch slot; one more is answered 429"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "min": 1, "help": "longest prompt in tokens (default: the model's context minus max_tokens_limit)"})
    max_tokens_limit: int = field(default=512, metadata={"min": 1, "help": "largest max_tokens a request may ask"})
    default_max_tokens: int = field(default=16, metadata={
        "min": 1, "help": "max_tokens of a completion request that gives none (OpenAI's default; at most "
                     "max_tokens_limit)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"min": 1024, "help": "largest request body (413 above)"})
    max_stop_strings: int = field(default=4, metadata={"min": 0, "help": "stop strings per request (OpenAI: 4)"})
    delta_roots: tuple[str, ...] = field(default=(), metadata={
        "help": "directories deltas may be loaded from while running (POST /v1/deltas); none: endpoint off"})

    def __post_init__(self) -> None:
        self.delta_roots = tuple(self.delta_roots)
        check_fields(self)
        if not self.host.strip():
            raise ConfigError("ServeConfig.host is empty: pass an address such as 127.0.0.1")
        if self.api_key is not None and (not self.api_key.strip() or any(c.isspace() for c in self.api_key)):
            raise ConfigError("the API key is empty or holds whitespace: choose a key without spaces")
