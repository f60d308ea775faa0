"""One streamed chat/completion chunk as it goes on the wire.

The OpenAI layer builds each chunk as an lmserve-protocols model
(``OpenAIGenerationService._chat_chunk`` / ``_completion_chunk``); routes/generation.py's
``chunk_event`` serialises it to JSON bytes and frames it as ``data: ...\\n\\n``. Both real
steps are timed together here (the async iteration around them is not).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from lmserve_core.generation.params import SamplingParams
from lmserve_core.generation.prepare import Prepared, PromptInput
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_protocols.openai import FinishReason
from lmserve_server.routes.generation import chunk_event

pytestmark = pytest.mark.benchmark(group="sse", max_time=0.5, min_rounds=5)


def _prepared(kind: str) -> Prepared:
    return Prepared(
        kind=kind,  # type: ignore[arg-type]
        request_id="chatcmpl-3f9c2a7e5b0d4e1fa6c8b2d9e0f1a2b3",
        created=1_760_000_000,
        model="smollm2-135m-instruct",
        prompts=[PromptInput(ids=[1, 2, 3], text="What is the capital of France?")],
        n=1,
        params=SamplingParams(max_tokens=128),
        stops=[],
        echo=False,
        stream=True,
        include_usage=False,
        logprobs=None,
    )


# The chunk builders read nothing from the service's backend, tokenizer or facts.
_SERVICE = OpenAIGenerationService(backend=None, tokenizer=None, facts=None)  # type: ignore[arg-type]


def _event(prep: Prepared, text: str | None, finish: FinishReason | None) -> bytes:
    if prep.kind == "chat":
        delta = {} if text is None else {"content": text}
        chunk: BaseModel = _SERVICE._chat_chunk(prep, 0, delta, None, finish)
    else:
        chunk = _SERVICE._completion_chunk(prep, 0, text or "", None, finish)
    return chunk_event(chunk)


@pytest.mark.parametrize(
    ("kind", "text", "finish"),
    [
        ("chat", " Paris", None),
        ("chat", None, "stop"),
        ("completion", " Paris", None),
    ],
    ids=["chat_delta", "chat_finish", "completion_delta"],
)
def test_sse_chunk(
    benchmark: Any, kind: str, text: str | None, finish: FinishReason | None
) -> None:
    prep = _prepared(kind)
    event = benchmark(_event, prep, text, finish)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    body = json.loads(event[len(b"data: ") :])
    choice = body["choices"][0]
    assert choice["finish_reason"] == finish and "usage" not in body
    if kind == "chat":
        assert choice["delta"] == ({} if text is None else {"content": text})
    else:
        assert choice["text"] == text
    benchmark.extra_info["event_bytes"] = len(event)
