"""Errors on the wire: OpenAI's and Anthropic's error bodies, request-validation messages, API-key checks."""

from __future__ import annotations

import hmac
import json

from fastapi.responses import JSONResponse

ANTHROPIC_PREFIX = "/v1/messages"  # routes that answer errors in Anthropic's shape


class APIError(Exception):
    """An HTTP error; rendered in OpenAI's shape, or Anthropic's on ``/v1/messages``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self, path: str = "") -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers, path)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None, path: str = "") -> JSONResponse:
    """The error in the shape of the API ``path`` belongs to (the field is named in the message for Anthropic)."""
    if path.startswith(ANTHROPIC_PREFIX):
        shown = f"{param}: {message}" if param and param not in message else message
        return JSONResponse(anthropic_error_body(status, shown), status, headers)
    return JSONResponse(error_body(message, type, param, code), status, headers)


def sse_error(message: str) -> str:
    """An error as one server-sent event (OpenAI streams)."""
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


# ----------------------------------------------------------------------------- request validation

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}


def _param_of(loc: tuple) -> str | None:
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p or p[:1].isupper()):
            break  # a union member tag (e.g. 'str', 'list[int]'), not a field
        parts.append(str(p))
    return ".".join(parts) or None


def validation_message(err: dict) -> tuple[str, str | None]:
    """A pydantic error as ``(one-line message, field)``."""
    param = _param_of(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    if err.get("type") == "missing" and param is None:
        return "the request body is missing: send a JSON object", None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"'{param}' is a required field", param
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return f"'{param}': {msg} (got {shown})", param


# ----------------------------------------------------------------------------- auth


class AuthMiddleware:
    """Rejects every request without the API key (before the body is read).

    The key comes as ``Authorization: Bearer <key>`` or, as Anthropic's clients send it, ``x-api-key: <key>``.
    """

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            ok = hmac.compare_digest(headers.get(b"authorization", b""), self.bearer) or \
                hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)
            if not ok:
                msg = ("missing or wrong API key: send the header 'Authorization: Bearer <key>' (or 'x-api-key: <key>') "
                       "with the key given to ember serve --api-key")
                resp = error_response(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                                      path=scope.get("path", ""))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
