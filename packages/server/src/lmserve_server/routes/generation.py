"""OpenAI Completions and Chat Completions, streaming (SSE) and not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event

from lmserve_core.errors import ModelNotReady
from lmserve_core.generation.prepare import Prepared
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest
from lmserve_server.dataplane import DataPlane

router = APIRouter(prefix="/openai/v1", tags=["openai"])
T = TypeVar("T")


def _plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = _plane(request).host.require_generator(body.model)
    return await _respond(service, service.prepare_completion(body), request)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    service = _plane(request).host.require_generator(body.model)
    return await _respond(service, service.prepare_chat(body), request)


async def _respond(service: OpenAIGenerationService, prep: Prepared, request: Request) -> Any:
    if prep.stream:
        # Starlette cancels the body iterator when the client disconnects; cancelling
        # it closes every choice's backend stream, which aborts generation.
        return EventSourceResponse(
            _sse(service.stream(prep)), headers={"Cache-Control": "no-cache"}
        )
    result = await _until_disconnect(request, service.complete(prep))
    return JSONResponse(result)


async def _sse(payloads: AsyncIterator[str]) -> AsyncIterator[bytes]:
    try:
        async for payload in payloads:
            yield format_sse_event(data_str=payload)
    finally:
        # Close the inner stream now (not at garbage collection): that aborts generation.
        await payloads.aclose()  # type: ignore[attr-defined]


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (aborting generation) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():
            raise ModelNotReady("client disconnected") from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
