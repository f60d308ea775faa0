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
    ModelList,
)
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.schema import responses

router = APIRouter(prefix="/openai/v1", tags=["openai"])


@router.get("/models", responses=responses(ModelList, openai=True, errors=()))
async def list_models(request: Request) -> Response:
    return json_response(ModelList(data=plane(request).model_cards()))


@router.post("/embeddings", responses=responses(EmbeddingResponse, openai=True))
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    dataplane = plane(request)
    model = request.state.model = dataplane.model_name(body.model)
    result = await dataplane.embed(body)
    request.state.prompt_tokens = result.token_count
    vectors = result.outputs[0].data
    data = [
        EmbeddingData(index=i, embedding=_format(vec, body.encoding_format, body.endianness))
        for i, vec in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.token_count, total_tokens=result.token_count)
    return json_response(EmbeddingResponse(data=data, model=model, usage=usage))


_BYTE_ORDER = {"native": "=", "little": "<", "big": ">"}


def _format(vector: np.ndarray, encoding: str, endianness: str) -> list[float] | str:
    if encoding == "base64":
        floats = np.asarray(vector, dtype=f"{_BYTE_ORDER[endianness]}f4")
        return base64.b64encode(floats.tobytes()).decode("ascii")
    return [float(x) for x in vector]
