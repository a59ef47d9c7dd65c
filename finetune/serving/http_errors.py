"""Errors as OpenAI's API answers them: `{"error": {"message", "type", "param", "code"}}` with a status.

The `openai` client turns these bodies into its exceptions (BadRequestError, RateLimitError, ...),
so every refusal the HTTP layer makes goes through ApiError, and nothing reaches the client as a
FastAPI default (422) or a bare 500.
"""

from __future__ import annotations

from typing import Optional

# status -> OpenAI's error type for it
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A refusal to send as an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """pydantic's first error as one sentence naming the field, and the field (for `param`)."""
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    # Union members show up as type names in the location (e.g. prompt.str); keep the field path only.
    field = ".".join(part for part in where if not part[:1].isupper() and part not in ("str", "int", "list"))
    message = first.get("msg", "is not valid")
    return (f"'{field}': {message}" if field else message), (field or None)
