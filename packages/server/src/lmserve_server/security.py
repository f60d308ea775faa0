"""``--api_key``: bearer-token checks for HTTP (ASGI middleware) and gRPC (interceptor).

Every inference and metadata route needs ``Authorization: Bearer KEY``; health (liveness,
readiness, model readiness: what Kubernetes probes call) and ``/metrics`` (what Prometheus
scrapes) stay open, as do the static API docs. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve_server.errors import route_path, send_error

# Paths anyone may call: health, metrics, the OpenAPI docs (no model data in any of them).
_OPEN_PATHS = frozenset(
    {"/", "/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/redoc", "/openapi.json",
     "/docs/oauth2-redirect"}
)  # fmt: skip
# KServe's model readiness routes: V2 ``/v2/models/{m}/ready``, V1 ``GET /v1/models/{m}``.
_OPEN_PATTERNS = (
    re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"),
    re.compile(r"^/v1/models/[^/:]+$"),
)
# gRPC methods anyone may call (the interceptor lives in grpc_service: grpc loads lazily).
OPEN_GRPC_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


class ApiKey:
    def __init__(self, key: str) -> None:
        self._expected = key.encode("utf-8")

    def accepts(self, authorization: str | bytes | None) -> bool:
        """``authorization``: the header's value, ``Bearer KEY`` (scheme case-insensitive)."""
        if authorization is None:
            return False
        raw = authorization.encode("utf-8") if isinstance(authorization, str) else authorization
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self._expected)


def is_open_path(method: str, path: str) -> bool:
    if path in _OPEN_PATHS:
        return True
    if method == "OPTIONS":  # CORS preflights carry no credentials by design
        return True
    return any(p.match(path) for p in _OPEN_PATTERNS)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = ApiKey(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open_path(scope["method"], route_path(scope)):
            await self.app(scope, receive, send)
            return
        if self.key.accepts(_header(scope["headers"], b"authorization")):
            await self.app(scope, receive, send)
            return
        await send_error(
            scope, send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
            kind="authentication_error", headers=[(b"www-authenticate", b"Bearer")],
        )  # fmt: skip


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None
