"""Every error leaves in one JSON shape: {"error": {"code", "message", "request_id"}}.

Domain errors (app.errors) map through its one table; FastAPI's validation errors and Starlette's
404/405 are rewritten into the same shape. Nothing here echoes the request or shows a traceback.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.errors import ServiceError, status_of

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "malformed_request", 413: "payload_too_large"}


def request_id_of(scope_state: dict[str, Any] | None) -> str:
    return str((scope_state or {}).get("request_id", ""))


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    *,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = json.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    extra = dict(headers or {})
    if retry_after_s is not None:
        extra["Retry-After"] = str(retry_after_s)
    return Response(body, status_code=status, media_type="application/json", headers=extra)


def service_error_response(error: ServiceError, request_id: str) -> Response:
    """The answer to one domain error: its status from the table, its headers, and Connection:
    close when the rest of the body was left unread."""
    headers = dict(error.headers)
    if error.closes_connection:
        headers["Connection"] = "close"
    return error_response(
        status_of(error), error.code, error.message, request_id, retry_after_s=error.retry_after_s, headers=headers
    )


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return service_error_response(exc, request_id_of(request.scope.get("state")))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    code = _HTTP_CODES.get(exc.status_code, phrase.lower().replace(" ", "_"))
    return error_response(
        exc.status_code, code, phrase, request_id_of(request.scope.get("state")), headers=dict(exc.headers or {})
    )


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Field locations and what was wrong; never the submitted values.
    problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
    return error_response(422, "invalid_field", problems, request_id_of(request.scope.get("state")))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
