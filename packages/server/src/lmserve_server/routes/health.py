"""Liveness and readiness (KServe routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from lmserve_protocols.v1 import ServerLiveness, V1ModelStatus
from lmserve_protocols.v2 import V2LiveResponse, V2ReadyResponse, V2ServerReady
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.lean import LeanRoute
from lmserve_server.routes.schema import responses

router = APIRouter(tags=["health"], route_class=LeanRoute)


@router.get("/", responses=responses(ServerLiveness, errors=()))
async def root() -> Response:
    return json_response(ServerLiveness())


@router.get("/v2/health/live", responses=responses(V2LiveResponse, errors=()))
async def live(request: Request) -> Response:
    return json_response(V2LiveResponse(live=plane(request).live()))


@router.get("/v2/health/ready", responses=responses(V2ServerReady, errors=(503,)))
async def ready(request: Request) -> Response:
    ok = plane(request).ready()
    return json_response(V2ServerReady(ready=ok), _ready_status(ok))


@router.get(
    "/v2/models/{model_name}/ready", responses=responses(V2ReadyResponse, errors=(404, 503))
)
async def model_ready(model_name: str, request: Request) -> Response:
    ok = plane(request).model_ready(model_name)
    return json_response(V2ReadyResponse(name=model_name, ready=ok), _ready_status(ok))


@router.get("/v1/models/{model_name}", responses=responses(V1ModelStatus, errors=(404, 503)))
async def v1_model_status(model_name: str, request: Request) -> Response:
    ok = plane(request).model_ready(model_name)
    return json_response(V1ModelStatus(name=model_name, ready=ok), _ready_status(ok))


def _ready_status(ready: bool) -> int:
    return 200 if ready else 503
