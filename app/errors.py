"""OpenAI-style error objects and the FastAPI handlers that make every failure one.

The official `openai` client maps the HTTP status to its exception class and reads ``{"error": {message, type,
param, code}}``; this module makes sure the service only ever answers errors in that shape, including FastAPI's
own validation and routing errors and unexpected crashes (500, with no traceback in the body).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kvcompact.api")


class APIError(Exception):
    """An error answered to the client. Subclasses fix the status and type; `code` and `param` refine them."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.code
        self.status_code = status_code if status_code is not None else self.status_code
        self.type = type if type is not None else self.type
        self.headers = headers or {}

    def to_body(self) -> dict[str, dict[str, Any]]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(APIError):
    """The compacted cache was made for another model (or format) than the one asked to use it."""

    status_code = 409
    type = "invalid_request_error"
    code = "model_mismatch"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnprocessableEntityError(APIError):
    status_code = 422
    type = "invalid_request_error"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalServerError(APIError):
    status_code = 500
    type = "server_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "server_error"
    code = "overloaded"


class GatewayTimeoutError(APIError):
    status_code = 504
    type = "server_error"
    code = "timeout"


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise to an OpenAI error body."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)


def error_response(error: APIError) -> JSONResponse:
    """The HTTP response for an APIError."""
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers)


def validation_error(errors: Sequence[Any], body: Any) -> BadRequestError:
    """A 400 naming the failing field the way OpenAI does ('messages.0.content'), from pydantic errors.

    A value that fails a union gets one error per member; the one reaching deepest into the body (the member the
    client evidently meant) is reported.
    """
    if not errors:
        return BadRequestError("The request body is invalid.")
    if any(error.get("type") == "json_invalid" for error in errors):
        return BadRequestError("We could not parse the JSON body of your request.", code="invalid_json")
    paths = [_param_path(tuple(error.get("loc", ())), body) for error in errors]
    deepest = max(range(len(errors)), key=lambda i: paths[i].count(".") + bool(paths[i]))
    chosen, param = errors[deepest], paths[deepest] or None
    if chosen.get("type") == "missing":
        what = f"required parameter: '{param}'" if param else "request body"
        return BadRequestError(f"Missing {what}.", param=param, code="missing_required_parameter")
    reason = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request body"
    return BadRequestError(f"Invalid value for {where}: {reason}", param=param, code="invalid_value")


def _param_path(loc: tuple[Any, ...], body: Any) -> str:
    """Dotted path of a pydantic error location, following the actual body so that union-member tags pydantic adds
    to `loc` ('str', 'list[...]', discriminator values) are dropped; a missing field is kept as the last part."""
    if loc[:1] != ("body",):  # query/path/header parameters have no unions to unwrap
        return ".".join(str(part) for part in loc[1:])
    parts: list[str] = []
    node = body
    path = loc[1:]
    for i, part in enumerate(path):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (i == len(path) - 1 and isinstance(node, dict)):
            continue
        parts.append(str(part))
    return ".".join(parts)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc.errors(), exc.body))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405, ...) and any HTTPException a router raises."""
    assert isinstance(exc, StarletteHTTPException)
    error_type = "server_error" if exc.status_code >= 500 else (
        "rate_limit_error" if exc.status_code == 429 else "invalid_request_error")
    error = APIError(str(exc.detail), status_code=exc.status_code, type=error_type, headers=dict(exc.headers or {}))
    return error_response(error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(InternalServerError("The server had an error while processing your request."))
