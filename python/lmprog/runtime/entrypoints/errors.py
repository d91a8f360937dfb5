"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, on every route.

As OpenAI's API: `type` is `invalid_request_error` for every 4xx and `server_error` for every 5xx;
`param` is the offending field's name (nested ones as `messages.[0].content`) or null; `code` is
one of OpenAI's codes (`invalid_api_key`, `model_not_found`, `context_length_exceeded`) or null.
Validation errors are 400 (never 422 or 5xx, which clients retry); 401 a missing or wrong API
key; 404 an unknown model or route; 413 an oversized body; 500 a fault of the server while
running a request; 503 (with Retry-After) a full queue or a dead scheduler.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmprog.runtime.sampling.param_error import ParamError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers
        self.code = code


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def error_payload(
    message: str, status: int = 400, param: str | None = None, code: str | None = None
) -> dict:
    """The error object (also sent as the last event of a stream that fails)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_payload(message, status, param, code), status, headers=headers)


def api_error_payload(e: APIError) -> dict:
    return error_payload(e.message, e.status, e.param, e.code)


def _param_path(loc: tuple) -> str | None:
    """pydantic's location ("body", "messages", 0, "content") as "messages.[0].content"."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character position, not a field
            message = f"the body is not valid JSON: {first.get('msg', '')}"
            ctx = first.get("ctx") or {}
            if ctx.get("error"):
                message += f" ({ctx['error']})"
            return error_response(400, message)
        where = _param_path(tuple(first.get("loc", ())))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(exc)
        if "input" in first and where:
            message += f" (got {first['input']!r})"[:300]
        return error_response(400, message, where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"Invalid URL ({request.method} {request.url.path}): {exc.detail}"
        return error_response(exc.status_code, message)

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        return error_response(400, str(exc), exc.param if isinstance(exc, ParamError) else None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        message = f"internal error while handling the request: {type(exc).__name__}: {exc}"
        return error_response(500, message)
