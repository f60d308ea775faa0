"""vLLM's runtime LoRA updates: ``POST /openai/v1/load_lora_adapter`` and
``/unload_lora_adapter``, with vLLM's bodies and its plain-text answers. Off (404) unless
``--enable_lora_runtime_updates`` or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set; the API key
guards them like every model route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from lmserve_core.errors import ModelNotFound
from lmserve_protocols.openai import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from lmserve_server.dataplane import DataPlane
from lmserve_server.routes import plane
from lmserve_server.routes.schema import responses

router = APIRouter(prefix="/openai/v1", tags=["openai"])


def _updating(request: Request) -> DataPlane:
    data = plane(request)
    if not data.lora_runtime_updates:
        raise ModelNotFound(
            "runtime LoRA updates are off: start lmserve with --enable_lora and "
            "--enable_lora_runtime_updates (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)"
        )
    return data


_TEXT_OK: dict[int | str, dict[str, Any]] = {200: {"description": "Success: LoRA adapter '<name>' added/removed successfully.",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}}  # fmt: skip


@router.post("/load_lora_adapter", responses=_TEXT_OK | responses(None, openai=True))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    request.state.model = body.lora_name
    message = await _updating(request).load_lora_adapter(body)
    return Response(message, media_type="text/plain")


@router.post(
    "/unload_lora_adapter",
    responses=_TEXT_OK | responses(None, openai=True, errors=(400, 404, 409, 413, 503)),
)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    request.state.model = body.lora_name
    message = await _updating(request).unload_lora_adapter(body)
    return Response(message, media_type="text/plain")
