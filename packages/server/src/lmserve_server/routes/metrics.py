"""``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lmserve_server.routes import plane

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    page = plane(request).render_metrics()
    # --api_workers: every worker's series added up (lmserve_server.worker_metrics).
    gather = getattr(request.app.state, "gather_metrics", None)
    if gather is not None:
        page = await gather(page)
    return Response(page, media_type=CONTENT_TYPE_LATEST)
