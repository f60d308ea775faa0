"""OpenAI Completions and Chat Completions, streaming (SSE) and not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from lmserve_core.admission import Ticket
from lmserve_core.errors import ClientDisconnected
from lmserve_core.generation.prepare import RequestHeaders
from lmserve_protocols.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from lmserve_protocols.wire import json_bytes
from lmserve_server.dataplane import AdmittedGeneration
from lmserve_server.errors import stream_error_event
from lmserve_server.routes import json_response, plane
from lmserve_server.routes.schema import responses

router = APIRouter(prefix="/openai/v1", tags=["openai"])
T = TypeVar("T")


@router.post(
    "/completions", responses=responses(CompletionResponse, openai=True, stream=CompletionChunk)
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    request.state.model = body.model
    admitted = await plane(request).admit_completion(body, _headers(request))
    return await _respond(admitted, request)


@router.post(
    "/chat/completions",
    responses=responses(ChatCompletionResponse, openai=True, stream=ChatCompletionChunk),
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    request.state.model = body.model
    admitted = await plane(request).admit_chat(body, _headers(request))
    return await _respond(admitted, request)


def _headers(request: Request) -> RequestHeaders:
    """What vLLM's server reads from the headers: the (sane) X-Request-Id names the response,
    X-Vllm-Priority replaces the body's priority."""
    return RequestHeaders(
        request_id=request.state.client_request_id,
        priority=request.headers.get("x-vllm-priority"),
    )


class _AdmittedStream(EventSourceResponse):
    """An SSE response that holds its admission ticket until the last byte (or the
    client's disconnect): a body iterator that never started would never run a
    ``finally``, so the release lives here."""

    def __init__(self, content: AsyncIterator[bytes], ticket: Ticket) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def _respond(generation: AdmittedGeneration, request: Request) -> Any:
    if generation.streaming:
        # Starlette cancels the body iterator when the client disconnects; cancelling
        # it closes every choice's backend stream, which aborts generation.
        events = generation.stream(on_usage=lambda usage: _log_usage(request, usage))
        return _AdmittedStream(_sse(events), generation.ticket)
    with generation.ticket:
        result = await _until_disconnect(request, generation.complete())
    _log_usage(request, result.usage)
    return json_response(result)


def _log_usage(request: Request, usage: UsageInfo) -> None:
    """Token counts for the access log line (``lmserve_server.access``)."""
    request.state.prompt_tokens = usage.prompt_tokens
    request.state.completion_tokens = usage.completion_tokens


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """Each chunk as a ``data:`` event, then ``data: [DONE]`` (also after an error event)."""
    try:
        async for chunk in chunks:
            yield chunk_event(chunk)
    except Exception as exc:
        # The status line went out with the first chunk: the error is the last event.
        yield sse_event(stream_error_event(exc).encode())
    finally:
        # Close the inner stream now (not at garbage collection): that aborts generation.
        await chunks.aclose()  # type: ignore[attr-defined]
    yield sse_event(b"[DONE]")


def chunk_event(chunk: BaseModel) -> bytes:
    """A stream chunk as its server-sent event."""
    return sse_event(json_bytes(chunk))


def sse_event(payload: bytes) -> bytes:
    """One server-sent event. A payload of one line only (pydantic's JSON escapes newlines), so
    this is FastAPI's ``format_sse_event(data_str=...)`` without its line splitting and without
    a str round trip: a chunk per token, it halves the cost of framing one."""
    return b"data: " + payload + b"\n\n"


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
            raise ClientDisconnected("the client disconnected") from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
