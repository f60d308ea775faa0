"""OpenAI-compatible routes: the model list and embeddings (generation is in ``generation``)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request, Response

from lmserve_protocols.openai import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
)
from lmserve_server.routes import plane
from lmserve_server.routes.schema import responses

router = APIRouter(prefix="/openai/v1", tags=["openai"])


@router.get("/models", responses=responses(ModelList, openai=True, errors=()))
async def list_models(request: Request) -> ModelList:
    cards = plane(request).model_cards()
    return ModelList(data=[ModelCard(id=name, created=created) for name, created in cards])


@router.post("/embeddings", responses=responses(EmbeddingResponse, openai=True))
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    request.state.model = body.model
    result = await plane(request).embed(body)
    request.state.prompt_tokens = result.token_count
    vectors = result.outputs[0].data
    data = [
        EmbeddingData(index=i, embedding=_format(vec, body.encoding_format))
        for i, vec in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.token_count, total_tokens=result.token_count)
    # Serialised here, once: returned as a model, FastAPI would validate it again and walk
    # every float through jsonable_encoder.
    response = EmbeddingResponse(data=data, model=body.model, usage=usage)
    return Response(response.model_dump_json(), media_type="application/json")


def _format(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
