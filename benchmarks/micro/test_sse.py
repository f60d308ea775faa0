"""One streamed chat/completion chunk as it goes on the wire.

The server builds each chunk's JSON in ``OpenAIGenerationService._chunk`` (a ``json.dumps``
of a dict, no pydantic model) and routes/generation.py's ``_sse`` frames it with FastAPI's
``format_sse_event(data_str=...)`` into ``data: ...\\n\\n``. Both real functions are timed
together here (the async iteration around them is not).
"""

from __future__ import annotations

from typing import Any

import pytest

from lmserve_core.generation.params import SamplingParams
from lmserve_core.generation.prepare import Prepared, PromptInput
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_server.routes.generation import format_sse_event

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


# _chunk reads nothing from the service's backend, tokenizer or facts.
_SERVICE = OpenAIGenerationService(backend=None, tokenizer=None, facts=None)  # type: ignore[arg-type]


def _event(prep: Prepared, body: Any, finish: str | None) -> bytes:
    return format_sse_event(data_str=_SERVICE._chunk(prep, 0, body, None, finish))


@pytest.mark.parametrize(
    ("kind", "body", "finish"),
    [
        ("chat", {"content": " Paris"}, None),
        ("chat", {}, "stop"),
        ("completion", " Paris", None),
    ],
    ids=["chat_delta", "chat_finish", "completion_delta"],
)
def test_sse_chunk(benchmark: Any, kind: str, body: Any, finish: str | None) -> None:
    prep = _prepared(kind)
    event = benchmark(_event, prep, body, finish)
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    benchmark.extra_info["event_bytes"] = len(event)
