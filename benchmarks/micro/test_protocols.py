"""Pydantic parsing of request bodies (lmserve_protocols), as FastAPI validates them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from lmserve_protocols.v2 import V2InferRequest

pytestmark = pytest.mark.benchmark(group="protocols", max_time=0.5, min_rounds=5)


def _bodies(texts: list[str]) -> dict[str, tuple[type[Any], bytes]]:
    chat = {
        "model": "smollm2-135m-instruct",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": texts[1]},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": texts[5]},
        ],
        "temperature": 0.7, "top_p": 0.95, "max_tokens": 128, "stop": ["\n\n"],
        "stream": True, "stream_options": {"include_usage": True}, "seed": 1234,
    }  # fmt: skip
    completion = {
        "model": "smollm2-135m-instruct", "prompt": texts[8], "max_tokens": 64,
        "temperature": 0.0, "stream": False, "logprobs": 2, "stop": ".",
    }  # fmt: skip
    embedding = {"model": "all-minilm-l6-v2", "input": texts, "encoding_format": "float"}
    v2 = {
        "id": "req-1",
        "parameters": {"truncate": True},
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "output-0", "parameters": {"binary_data": False}}],
    }
    return {
        "chat_completion": (ChatCompletionRequest, json.dumps(chat).encode()),
        "completion": (CompletionRequest, json.dumps(completion).encode()),
        "embedding_32": (EmbeddingRequest, json.dumps(embedding).encode()),
        "v2_infer_32": (V2InferRequest, json.dumps(v2).encode()),
    }


@pytest.mark.parametrize("kind", ["chat_completion", "completion", "embedding_32", "v2_infer_32"])
def test_model_validate_json(
    benchmark: Any, prompt_batch: Callable[[int], list[str]], kind: str
) -> None:
    model, body = _bodies(prompt_batch(32))[kind]
    parsed = benchmark(model.model_validate_json, body)
    assert isinstance(parsed, model)
    benchmark.extra_info["body_bytes"] = len(body)
