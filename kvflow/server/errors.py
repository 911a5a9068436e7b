"""Every failure becomes an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`.

Clients (the openai package, LangChain) parse this shape to raise typed exceptions, so no route
may answer with FastAPI's default `{"detail": ...}`; the handlers here cover validation errors,
HTTP errors from routing, engine errors and anything unexpected.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflow.engine.core_client import EngineDeadError
from kvflow.server.async_engine import OverloadedError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 503: "service_unavailable"}


_UNION_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "stop must be a string, a list of strings, or null",
}


class APIError(Exception):
    """An error with a status the client should see (raised by the serving code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map the engine's exceptions to statuses; used for plain responses and inside streams."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, OverloadedError):
        return APIError(503, str(exc), code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"engine unavailable: {exc}", code="engine_dead")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', 'decode error')}", None
    param = loc[0] if loc else None
    if param in _UNION_HINTS and all(tuple(e.get("loc", ()))[1:2] == (param,) for e in errors):
        return _UNION_HINTS[param], param  # pydantic reports one error per union member: say it once
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    where = f"{'.'.join(loc)}: " if loc else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # our validators' own words
    return f"{where}{message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def _mapped(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    # Expected errors are answered by the exception middleware; anything else reaches the
    # outermost handler, which answers 500 in our shape and lets uvicorn log the traceback.
    for cls in (APIError, ValueError, OverloadedError, EngineDeadError, Exception):
        app.add_exception_handler(cls, _mapped)
