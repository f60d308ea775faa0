"""Rerank and score: vLLM's ``/rerank`` (also at ``/v1/rerank``, ``/v2/rerank`` and KServe's
``/openai/v1/rerank``) and ``/score`` (also ``/v1/score`` and ``/openai/v1/score``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from lmserve_protocols.scoring import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.schema import responses

router = APIRouter(tags=["retrieval"])

RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank", "/openai/v1/rerank")
SCORE_PATHS = ("/score", "/v1/score", "/openai/v1/score")


async def rerank(body: RerankRequest, request: Request) -> Response:
    dataplane = plane(request)
    request.state.model = dataplane.model_name(body.model)
    response = await dataplane.rerank(body)
    request.state.prompt_tokens = response.usage.prompt_tokens
    return json_response(response)


async def score(body: ScoreRequest, request: Request) -> Response:
    dataplane = plane(request)
    request.state.model = dataplane.model_name(body.model)
    response = await dataplane.score(body)
    request.state.prompt_tokens = response.usage.prompt_tokens
    return json_response(response)


for _path in RERANK_PATHS:
    router.add_api_route(
        _path, rerank, methods=["POST"], responses=responses(RerankResponse, openai=True)
    )
for _path in SCORE_PATHS:
    router.add_api_route(
        _path, score, methods=["POST"], responses=responses(ScoreResponse, openai=True)
    )
