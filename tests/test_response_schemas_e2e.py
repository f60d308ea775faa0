"""Every route's real responses validate against the lmserve-protocols models that
``/openapi.json`` names for them (tiny trained models, real server processes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from _support.servers import ServerProcess
from _support.tiny_model_checks import CHAT_ANSWERS, RAW_COMPLETIONS
from _support.tiny_models import model_path
from lmserve_protocols.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    EmbeddingResponse,
    ModelList,
    OpenAIErrorResponse,
)
from lmserve_protocols.scoring import RerankResponse, ScoreResponse
from lmserve_protocols.v1 import ServerLiveness, V1ModelList, V1ModelStatus, V1PredictResponse
from lmserve_protocols.v2 import (
    V2Error,
    V2InferResponse,
    V2LiveResponse,
    V2ModelMetadata,
    V2ReadyResponse,
    V2ServerMetadata,
    V2ServerReady,
)
from lmserve_server.routes.retrieval import RERANK_PATHS, SCORE_PATHS

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]


def valid(model: type[BaseModel], response: httpx.Response, status: int = 200) -> BaseModel:
    assert response.status_code == status, response.text
    return model.model_validate(response.json(), strict=False)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def schema_names(server: ServerProcess, path: str, method: str) -> dict[str, str]:
    """Status -> the component each documented response body names."""
    operation = httpx.get(server.url + "/openapi.json").json()["paths"][path][method]
    return {
        status: body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        for status, body in operation["responses"].items()
        if "application/json" in body.get("content", {})
    }


def test_kserve_routes_answer_as_documented(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("sentiment")))
    with server.client() as c:
        valid(ServerLiveness, c.get("/"))
        valid(V2LiveResponse, c.get("/v2/health/live"))
        valid(V2ServerReady, c.get("/v2/health/ready"))
        valid(V2ReadyResponse, c.get("/v2/models/model/ready"))
        valid(V1ModelStatus, c.get("/v1/models/model"))
        valid(V1ModelList, c.get("/v1/models"))
        valid(V2ServerMetadata, c.get("/v2"))
        meta = valid(V2ModelMetadata, c.get("/v2/models/model"))
        assert isinstance(meta, V2ModelMetadata) and meta.outputs[0].datatype == "INT64"
        body = {"instances": ["I love this", "I hate this"]}
        predicted = valid(V1PredictResponse, c.post("/v1/models/model:predict", json=body))
        assert isinstance(predicted, V1PredictResponse) and len(predicted.predictions) == 2
        v2 = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["I love this"]}]}
        inferred = valid(V2InferResponse, c.post("/v2/models/model/infer", json=v2))
        assert isinstance(inferred, V2InferResponse) and inferred.model_name == "model"
        # Errors: KServe's body, as documented.
        valid(V2Error, c.post("/v1/models/nope:predict", json=body), 404)
        valid(V2Error, c.post("/v1/models/model:predict", json={"instances": 3}), 400)
        valid(V2Error, c.get("/v2/models/nope"), 404)
    assert schema_names(server, "/v1/models/{model_name}:predict", "post") == {
        "200": "V1PredictResponse", "400": "V2Error", "404": "V2Error", "413": "V2Error",
        "429": "V2Error", "503": "V2Error",
    }  # fmt: skip
    assert schema_names(server, "/v2/models/{model_name}/infer", "post")["200"] == "V2InferResponse"


def test_openai_embeddings_answer_as_documented(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("embedding_mean")))
    with server.client() as c:
        valid(ModelList, c.get("/openai/v1/models"))
        body = {"model": "model", "input": ["a cat", "a dog"]}
        embedded = valid(EmbeddingResponse, c.post("/openai/v1/embeddings", json=body))
        assert isinstance(embedded, EmbeddingResponse) and len(embedded.data) == 2
        valid(
            OpenAIErrorResponse, c.post("/openai/v1/embeddings", json={**body, "model": "x"}), 404
        )
    assert schema_names(server, "/openai/v1/embeddings", "post")["200"] == "EmbeddingResponse"


def test_rerank_and_score_answer_as_documented(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("embedding_mean")))
    with server.client() as c:
        for path in RERANK_PATHS:
            body = {"query": "a cat", "documents": ["a dog", "a cat"], "top_n": 1}
            ranked = valid(RerankResponse, c.post(path, json=body))
            assert isinstance(ranked, RerankResponse) and ranked.results[0].index == 1
            valid(OpenAIErrorResponse, c.post(path, json={**body, "documents": []}), 400)
            assert schema_names(server, path, "post")["200"] == "RerankResponse"
        for path in SCORE_PATHS:
            body = {"text_1": "a cat", "text_2": ["a dog", "a cat"]}
            scored = valid(ScoreResponse, c.post(path, json=body))
            assert isinstance(scored, ScoreResponse) and len(scored.data) == 2
            valid(OpenAIErrorResponse, c.post(path, json={**body, "model": "x"}), 404)
            assert schema_names(server, path, "post")["200"] == "ScoreResponse"


def test_generation_answers_and_chunks_as_documented(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    question = next(iter(CHAT_ANSWERS))
    prompt = next(iter(RAW_COMPLETIONS))
    chat = {"model": "model", "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    completion = {"model": "model", "prompt": prompt, "temperature": 0, "max_tokens": 8,
                  "logprobs": 2, "echo": True}  # fmt: skip
    with server.client() as c:
        answer = valid(ChatCompletionResponse, c.post("/openai/v1/chat/completions", json=chat))
        assert isinstance(answer, ChatCompletionResponse)
        assert answer.choices[0].message.content == CHAT_ANSWERS[question]
        assert answer.choices[0].logprobs is not None
        text = valid(CompletionResponse, c.post("/openai/v1/completions", json=completion))
        assert isinstance(text, CompletionResponse) and text.choices[0].logprobs is not None
        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        chunks = events(c.post("/openai/v1/chat/completions", json=streamed))
        parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]
        assert parsed[0].choices[0].delta.role == "assistant"
        assert parsed[-1].usage is not None and parsed[-1].choices == []
        # vLLM's wire shape: a delta carries only what it adds, usage only the last chunk.
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(set(c["choices"][0]["delta"]) <= {"content"} for c in chunks[1:-1])
        assert all("usage" not in chunk for chunk in chunks[:-1])
        text_chunks = events(c.post("/openai/v1/completions", json={**completion, "stream": True}))
        assert all(CompletionChunk.model_validate(chunk) for chunk in text_chunks)
        error = c.post("/openai/v1/chat/completions", json={**chat, "temperature": 7})
        valid(OpenAIErrorResponse, error, 400)
    names = schema_names(server, "/openai/v1/chat/completions", "post")
    assert names["200"] == "ChatCompletionResponse" and names["400"] == "OpenAIErrorResponse"
