"""Liveness and readiness (KServe routes)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lmserve_server.routes import plane

router = APIRouter(tags=["health"])


@router.get("/")
async def root() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = plane(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{model_name}/ready")
async def model_ready(model_name: str, request: Request) -> JSONResponse:
    ok = plane(request).model_ready(model_name)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/v1/models/{model_name}")
async def v1_model_status(model_name: str, request: Request) -> JSONResponse:
    ok = plane(request).model_ready(model_name)
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)
