"""Liveness and readiness (KServe routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lmserve_protocols.v1 import V1ModelStatus
from lmserve_protocols.v2 import V2LiveResponse, V2ReadyResponse, V2ServerReady
from lmserve_server.routes import plane
from lmserve_server.routes.schema import responses

router = APIRouter(tags=["health"])


@router.get("/")
async def root() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/v2/health/live", responses=responses(V2LiveResponse, errors=()))
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", responses=responses(V2ServerReady, errors=(503,)))
async def ready(request: Request) -> JSONResponse:
    ok = plane(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get(
    "/v2/models/{model_name}/ready", responses=responses(V2ReadyResponse, errors=(404, 503))
)
async def model_ready(model_name: str, request: Request) -> JSONResponse:
    ok = plane(request).model_ready(model_name)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/v1/models/{model_name}", responses=responses(V1ModelStatus, errors=(404, 503)))
async def v1_model_status(model_name: str, request: Request) -> JSONResponse:
    ok = plane(request).model_ready(model_name)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)
