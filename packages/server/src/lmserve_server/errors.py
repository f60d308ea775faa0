"""The one place where lmserve_core errors become HTTP statuses and protocol bodies.

KServe V1/V2 routes answer ``{"error": "message"}``; OpenAI routes answer
``{"error": {"message", "type", "param", "code"}}``. Client errors are never 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from lmserve_core.errors import (
    BackendError,
    ConfigurationError,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PredictorError,
)

logger = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[LmserveError], int, str], ...] = (
    (InvalidInput, 400, "invalid_request_error"),
    (ModelNotFound, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    (ModelNotReady, 503, "service_unavailable"),
    # Before BackendError, its parent: the predictor (Triton) failed, not lmserve.
    (PredictorError, 502, "bad_gateway"),
    (BackendError, 500, "internal_server_error"),
    (ConfigurationError, 500, "internal_server_error"),
)


def status_of(exc: LmserveError) -> tuple[int, str]:
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_server_error"


def route_path(scope: Scope) -> str:
    """The path inside lmserve's app: without the prefix it is mounted under (``root_path``),
    so protocol-by-path decisions hold in an app mounted at ``/lm`` (lmserve_server.embed)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def error_body(path: str, status: int, message: str, kind: str, param: str | None = None) -> Any:
    if path.startswith("/openai/"):
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"error": message}


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The same error bodies from pure ASGI middleware (before any route runs)."""
    raw = json.dumps(error_body(route_path(scope), status, message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": raw})


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(route_path(request.scope), status, message, kind, param)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and param is None:
            param = ".".join(loc)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LmserveError)
    async def _lmserve(request: Request, exc: LmserveError) -> JSONResponse:
        status, kind = status_of(exc)
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(
            request, status, exc.message, kind=kind, param=exc.param, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, 400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, exc.status_code, str(exc.detail), kind=kind,
                              headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}",
                              kind="internal_server_error")  # fmt: skip
