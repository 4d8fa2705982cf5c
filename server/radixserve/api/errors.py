"""Every error leaves the server in OpenAI's shape: {"error": {message, type, param, code}}.

Pydantic's 422 becomes a 400 (as in vLLM and SGLang), so clients see one status for every
invalid field, and the message names the field.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("radixserve.api")

_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}


class APIError(Exception):
    """Raised anywhere under a route; becomes the OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else None)


def from_value_error(e: ValueError) -> APIError:
    """SamplingParams raise 'field: why'; the field becomes `param`."""
    text = str(e)
    field, sep, _ = text.partition(":")
    param = field if sep and " " not in field else None
    return bad_request(text, param)


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


# Anthropic's Messages API answers in its own shape; its SDK reads the type and the status.
ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body_for(
    path: str, status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """The error body in the shape of the API that `path` belongs to."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_body(status, message)
    return error_body(status, message, param, code)


class _ASCIIJSONResponse(JSONResponse):
    """Escapes everything outside ASCII: a message that quotes the client's input stays
    valid JSON even when that input held a lone surrogate (no 500 while reporting a 400)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(e: APIError, path: str = "") -> JSONResponse:
    return _ASCIIJSONResponse(
        error_body_for(path, e.status, e.message, e.param, e.code),
        status_code=e.status,
        headers=e.headers,
    )


def _loc(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_tag(part):
            out += f".{part}" if out else str(part)
    return out


def _is_union_tag(part: str) -> bool:
    """Pydantic names the union member it tried ('str', 'list[int]'); not a field name."""
    return (
        "[" in part
        or part in ("str", "int", "float", "bool", "dict", "list", "none")
        or part.startswith(("function-", "tagged-union"))
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if not errors:
            return error_response(bad_request("invalid request body"), request.url.path)
        first = errors[0]
        param = _loc(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error_response(
                bad_request(f"request body is not valid JSON: {first['msg']}"), request.url.path
            )
        if first.get("type") == "missing" and not param:
            return error_response(bad_request("request body is missing"), request.url.path)
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return error_response(bad_request(message, param or None), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(
            APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)),
            request.url.path,
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(
            APIError(500, f"internal error: {type(e).__name__}"), request.url.path
        )
