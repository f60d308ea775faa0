"""The one place where lmserve_core errors become HTTP and gRPC statuses and protocol bodies.

KServe V1/V2 routes answer ``{"error": "message"}``; OpenAI routes answer
``{"error": {"message", "type", "param", "code"}}``, and so does an error event in a stream that
already started. The gRPC service reads its status codes from the same table (by name: the HTTP
app does not import grpc). Client errors are never 500.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from lmserve_core.errors import (
    BackendError,
    ClientDisconnected,
    ConfigurationError,
    Conflict,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PredictorError,
)
from lmserve_protocols.openai import OpenAIErrorDetail, OpenAIErrorResponse
from lmserve_protocols.v2 import V2Error
from lmserve_protocols.wire import json_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    """How one kind of error reaches a client."""

    http: int
    kind: str  # the OpenAI error ``type``
    grpc: str  # a ``grpc.StatusCode`` name


_INTERNAL = Status(500, "internal_server_error", "INTERNAL")
# Most specific first.
_STATUS: tuple[tuple[type[LmserveError], Status], ...] = (
    (InvalidInput, Status(400, "invalid_request_error", "INVALID_ARGUMENT")),
    (ModelNotFound, Status(404, "not_found_error", "NOT_FOUND")),
    (Conflict, Status(409, "conflict_error", "FAILED_PRECONDITION")),
    (Overloaded, Status(429, "rate_limit_error", "RESOURCE_EXHAUSTED")),
    # nginx's "client closed request": the client left; nothing failed on this side.
    (ClientDisconnected, Status(499, "client_closed_request", "CANCELLED")),
    (ModelNotReady, Status(503, "service_unavailable", "UNAVAILABLE")),
    # Before BackendError, its parent: the predictor (Triton) failed, not lmserve. gRPC has
    # no "bad gateway": UNAVAILABLE is what grpc-gateway maps 502 to.
    (PredictorError, Status(502, "bad_gateway", "UNAVAILABLE")),
    (BackendError, _INTERNAL),
    (ConfigurationError, _INTERNAL),
)


def status_of(exc: LmserveError) -> Status:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return _INTERNAL


def stream_error_event(exc: Exception) -> str:
    """The ``data:`` payload that ends a stream whose status line was already sent."""
    if isinstance(exc, LmserveError):
        status, message, param = status_of(exc), exc.message, exc.param
        if status.http >= 500:
            logger.error("stream ended with an error: %s", message)
    else:  # a bug: the traceback goes to the log, not to the client
        logger.error("generation failed mid-stream", exc_info=exc)
        status, message, param = _INTERNAL, f"generation failed: {type(exc).__name__}", None
    return _openai_error(message, status.kind, param, status.http).model_dump_json()


def route_path(scope: Scope) -> str:
    """The path inside lmserve's app: without the prefix it is mounted under (``root_path``),
    so protocol-by-path decisions hold in an app mounted at ``/lm`` (lmserve_server.embed)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _openai_error(message: str, kind: str, param: str | None, status: int) -> OpenAIErrorResponse:
    detail = OpenAIErrorDetail(message=message, type=kind, param=param, code=status)
    return OpenAIErrorResponse(error=detail)


# vLLM's routes served at its own paths (outside /openai/): OpenAI error bodies, as vLLM's.
VLLM_ROOT_PATHS = frozenset(
    {"/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score", "/tokenize", "/detokenize"}
)


def error_body(
    path: str, status: int, message: str, kind: str, param: str | None = None
) -> OpenAIErrorResponse | V2Error:
    """The error body of the protocol that owns ``path``."""
    if path.startswith("/openai/") or path in VLLM_ROOT_PATHS:
        return _openai_error(message, kind, param, status)
    return V2Error(error=message)


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
    raw = json_bytes(error_body(route_path(scope), status, message, kind))
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
) -> Response:
    body = error_body(route_path(request.scope), status, message, kind, param)
    return Response(
        json_bytes(body), status_code=status, headers=headers, media_type="application/json"
    )


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
    async def _lmserve(request: Request, exc: LmserveError) -> Response:
        status = status_of(exc)
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        if status.http >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(
            request, status.http, exc.message, kind=status.kind, param=exc.param, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(request, 400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, exc.status_code, str(exc.detail), kind=kind,
                              headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error: {type(exc).__name__}",
                              kind="internal_server_error")  # fmt: skip
