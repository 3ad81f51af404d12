"""Putting a server together: load the model, its tokenizer and deltas, then run uvicorn in the foreground
(``deltaformer serve``) or on a background thread (tests and benchmarks, which need a real socket)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .app import create_app
from .service import Service
from .settings import ServeConfig


def load_service(model_path: str | Path, settings: ServeConfig, deltas: Sequence[tuple[str, str]] = (),
                 name: str | None = None, chat_template: str | Path | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> Service:
    """A :class:`Service` over the causal LM at ``model_path`` (a directory, a GGUF file or an asset name)
    with the deltas ``(name, directory)`` attached."""
    from ..models.auto import load_model
    from ..tokenizer import AutoTokenizer

    model = load_model(model_path)
    model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = _chat_template(chat_template)
    service = Service(model, tokenizer, settings, name or _served_name(model_path), template)
    for delta_name, directory in deltas:
        service.registry.add(delta_name, directory, trusted=True)
    return service


def _served_name(model_path: str | Path) -> str:
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


def _chat_template(given: str | Path | None) -> str | None:
    """``--chat-template FILE`` (else None: the tokenizer's own template applies)."""
    if given is None:
        return None
    path = Path(given)
    if not path.is_file():
        raise ConfigError(f"chat template file {path} does not exist: pass a Jinja template file")
    return path.read_text(encoding="utf-8")


def _config(service: Service) -> Any:
    import uvicorn

    settings = service.settings
    return uvicorn.Config(create_app(service), host=settings.host, port=settings.port, log_level="warning",
                          access_log=False, timeout_graceful_shutdown=5, server_header=False,
                          h11_max_incomplete_event_size=64 * 1024)


def serve(service: Service) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM finish the open requests' connections, then stop)."""
    import uvicorn

    uvicorn.Server(_config(service)).run()


class BackgroundServer:
    """A real server on a free port of 127.0.0.1 on a thread: ``with BackgroundServer(service) as url:``."""

    def __init__(self, service: Service) -> None:
        import uvicorn

        self.service = service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind((service.settings.host, service.settings.port))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(_config(service))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.service.settings.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
