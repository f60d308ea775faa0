"""OpenAI-compatible routes: model list and embeddings (generation arrives with issue 3)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from lmserve_core.errors import InvalidInput
from lmserve_core.tasks import Task
from lmserve_protocols.openai import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
)
from lmserve_server.dataplane import DataPlane

router = APIRouter(prefix="/openai/v1", tags=["openai"])


def _plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    host = _plane(request).host
    return ModelList(data=[ModelCard(id=host.name, created=host.created)])


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    plane = _plane(request)
    request.state.model = body.model
    service = plane.host.require(body.model)
    if service.task is not Task.text_embedding:
        raise InvalidInput(
            f"model {body.model!r} serves {service.task.value}, not text_embedding", param="model"
        )
    dim = service.info.hidden_size
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidInput(
            f"this model does not support 'dimensions' other than its native {dim}",
            param="dimensions",
        )
    texts, token_rows = _split_input(body.input)
    if texts is not None:
        result = await plane.infer_texts(body.model, texts, None)
    else:
        result = await plane.infer_token_ids(body.model, token_rows or [])
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


def _split_input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput("'input' must be a non-empty string or list", param="input")
    if all(isinstance(v, str) for v in value):
        if any(v == "" for v in value):
            raise InvalidInput("'input' must not contain empty strings", param="input")
        return list(value), None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None, [list(value)]
    if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
        return None, [list(v) for v in value]
    raise InvalidInput(
        "'input' must be a string, a list of strings, or token id lists", param="input"
    )


def _format(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
