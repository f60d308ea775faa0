"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, at vLLM's paths and under ``/openai/v1``
with lmserve's other OpenAI routes; every task, both backends. The model is not run and no
admission slot is taken: clients count tokens before they send."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from lmserve_protocols.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.schema import responses

# Errors at vLLM's own paths have OpenAI's body too (lmserve_server.errors.VLLM_ROOT_PATHS).
router = APIRouter(tags=["tokenize"])
_ERRORS = (400, 404, 413, 503)
_TOKENIZE: TypeAdapter[TokenizeCompletionRequest | TokenizeChatRequest] = TypeAdapter(
    TokenizeRequest
)
_TOKENIZE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _TOKENIZE.json_schema()}}}}  # fmt: skip


def _tokenize_body(raw: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The body as its form (``messages``: chat), parsed by hand for errors that name the field
    ("messages", not the union's "chat.messages"). pydantic's JSON parser also refuses lone
    surrogates, which no tokenizer could encode."""
    try:
        return _TOKENIZE.validate_json(raw)
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            loc = error["loc"]
            if loc and loc[0] in ("completion", "chat"):  # the form's tag, not a field
                loc = loc[1:]
            errors.append({**error, "loc": ("body", *loc)})
        raise RequestValidationError(errors) from None


_TOKENIZE_OK = responses(TokenizeResponse, openai=True, errors=_ERRORS)


@router.post("/tokenize", openapi_extra=_TOKENIZE_BODY, responses=_TOKENIZE_OK)
@router.post("/openai/v1/tokenize", openapi_extra=_TOKENIZE_BODY, responses=_TOKENIZE_OK)
async def tokenize(request: Request) -> Response:
    """A ``prompt`` (``add_special_tokens`` true by default) or chat ``messages`` (rendered as
    chat completions render them) to token ids, with ``token_strs`` when
    ``return_token_strs`` is true."""
    body = _tokenize_body(await request.body())
    data = plane(request)
    request.state.model = body.model or data.model_names()[0]
    return json_response(await data.tokenize(body))


@router.post("/detokenize", responses=responses(DetokenizeResponse, openai=True, errors=_ERRORS))
@router.post(
    "/openai/v1/detokenize",
    responses=responses(DetokenizeResponse, openai=True, errors=_ERRORS),
)
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    """Token ids to text, special tokens included; ids outside the vocabulary are a 400."""
    data = plane(request)
    request.state.model = body.model or data.model_names()[0]
    return json_response(await data.detokenize(body))
