"""Open Inference Protocol (V2) REST: metadata and infer, JSON and binary tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from lmserve_core.errors import InvalidInput
from lmserve_core.v2_codec import HEADER_LENGTH, decode_inputs, encode_response, split_binary_body
from lmserve_protocols.v2 import V2InferRequest, V2InferResponse, V2ModelMetadata, V2ServerMetadata
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.lean import LeanRoute
from lmserve_server.routes.schema import request_body_schema, responses

router = APIRouter(tags=["v2"], route_class=LeanRoute)


@router.get("/v2", responses=responses(V2ServerMetadata, errors=()))
async def server_metadata(request: Request) -> Response:
    return json_response(plane(request).server_metadata())


@router.get("/v2/models/{model_name}", responses=responses(V2ModelMetadata, errors=(404, 503)))
@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    responses=responses(V2ModelMetadata, errors=(404, 503)),
)
async def model_metadata(
    model_name: str, request: Request, model_version: str | None = None
) -> Response:
    return json_response(plane(request).model_metadata(model_name))


@router.post(
    "/v2/models/{model_name}/infer",
    openapi_extra=request_body_schema(V2InferRequest),
    responses=responses(V2InferResponse),
)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    openapi_extra=request_body_schema(V2InferRequest),
    responses=responses(V2InferResponse),
)
async def infer(model_name: str, request: Request, model_version: str | None = None) -> Response:
    payload, binary = split_binary_body(await request.body(), request.headers.get(HEADER_LENGTH))
    try:
        infer_request = V2InferRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"invalid V2 request at {where or 'body'}: {first['msg']}") from None
    inputs = decode_inputs(infer_request.inputs, binary)
    params = infer_request.parameters or {}
    requested = [o.name for o in infer_request.outputs or []]
    result = await plane(request).infer_v2(model_name, inputs, params, requested)
    request.state.prompt_tokens = result.token_count
    outputs = result.outputs
    binary_names = _binary_outputs(infer_request, [name for name, _, _ in outputs])
    body, header_length = encode_response(
        outputs, model_name=model_name, request_id=infer_request.id, binary_outputs=binary_names
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


def _binary_outputs(req: V2InferRequest, names: list[str]) -> set[str]:
    """Outputs to send in binary: all with ``binary_data_output``, or per output."""
    params = req.parameters or {}
    chosen = set(names) if params.get("binary_data_output") is True else set()
    for out in req.outputs or []:
        flag = (out.parameters or {}).get("binary_data")
        if flag is True:
            chosen.add(out.name)
        elif flag is False:
            chosen.discard(out.name)
    return chosen
