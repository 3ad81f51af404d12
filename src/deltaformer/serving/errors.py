"""Errors the server answers with, as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``.

Clients written for OpenAI (its Python package among them) read the status and this body to raise their own
exceptions (``BadRequestError``, ``RateLimitError``, ...), so every refusal goes through :class:`ApiError`.
"""

from __future__ import annotations

from typing import Any

from ..errors import DeltaformerError

#: OpenAI's ``error.type`` for each status the server sends.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class ApiError(DeltaformerError):
    """A request the server refuses: HTTP ``status`` plus a one-line message that says what to change."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
