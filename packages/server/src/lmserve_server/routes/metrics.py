"""``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.metrics
    host = request.app.state.dataplane.host
    m.model_ready.labels(host.name).set(1 if request.app.state.dataplane.ready() else 0)
    generator = host.generator
    if generator is not None:
        try:
            m.sequences_unfinished.set(generator.backend.num_unfinished())
        except Exception:  # a dead engine must not break the metrics page
            m.sequences_unfinished.set(0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
