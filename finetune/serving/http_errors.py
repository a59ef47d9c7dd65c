"""Errors as OpenAI's API answers them: `{"error": {"message", "type", "param", "code"}}` with a status.

The `openai` client turns these bodies into its exceptions (BadRequestError, RateLimitError, ...),
so every refusal the HTTP layer makes goes through ApiError, and nothing reaches the client as a
FastAPI default (422) or a bare 500.
"""

from __future__ import annotations

import re
from typing import Optional

TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|function-\w+)(\[.*\])?$|^[A-Z]")

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
    # A union field (prompt, stop) reports one error per member; the member whose type matched says
    # what is really wrong ("at most 16 items" rather than "should be a valid string").
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    # Union members appear in the location as type tags (prompt.list[str].0); keep field names and indices.
    where = [str(part) for part in first.get("loc", ()) if part != "body" and not TYPE_TAG.match(str(part))]
    path = ".".join(where)
    message = first.get("msg", "is not valid")
    field = where[0] if where else None
    if len(errors) > 1 and first is errors[0] and str(first.get("type", "")).endswith("_type"):
        message += " (nor does it fit any other form the field accepts)"  # every member of a union refused it
    return (f"'{path}': {message}" if path else message), field
