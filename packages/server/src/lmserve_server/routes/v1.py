"""KServe V1: list models and ``:predict``."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from lmserve_core.errors import InvalidInput
from lmserve_protocols.v1 import V1ModelList, V1PredictRequest, V1PredictResponse
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.lean import LeanRoute
from lmserve_server.routes.schema import request_body_schema, responses

router = APIRouter(tags=["v1"], route_class=LeanRoute)


@router.get("/v1/models", responses=responses(V1ModelList, errors=()))
async def list_models(request: Request) -> Response:
    return json_response(V1ModelList(models=plane(request).model_names()))


@router.post(
    "/v1/models/{model_name}:predict",
    # The body is parsed by hand for precise errors; the schema is declared for clients.
    openapi_extra=request_body_schema(V1PredictRequest),
    responses=responses(V1PredictResponse),
)
async def predict(model_name: str, request: Request) -> Response:
    payload = _parse_json(await request.body())
    instances = payload.get("instances", payload.get("inputs"))
    if instances is None:
        raise InvalidInput('expected {"instances": [...]} or {"inputs": [...]}', param="instances")
    parameters = payload.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object", param="parameters")
    result = await plane(request).infer_texts(model_name, instances, parameters)
    request.state.prompt_tokens = result.token_count
    return json_response(V1PredictResponse(predictions=result.predictions))


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput("request body must be a JSON object")
    return payload
