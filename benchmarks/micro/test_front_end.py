"""A request's front-end cost without the model: the web framework and the response encoding.

- Framework: the same ``:predict`` handler (the body parsed by hand, as lmserve's V1 route
  does; a pydantic response serialised once) mounted as a FastAPI route, as lmserve's
  ``LeanRoute`` (a FastAPI route calling its endpoint directly, used by the V1, V2 and health
  routes) and as a plain Starlette route, driven in-process over ASGI (no sockets, no
  server): what FastAPI's parameter solving adds per request, and what LeanRoute saves.
- Response encoding: a V1 predict response and an OpenAI embeddings response (32 x 384
  floats) by pydantic's ``model_dump_json`` (what lmserve uses) vs ``orjson.dumps`` of the
  dumped dict.

Each case runs ``REQUESTS`` requests per round; ``extra_info["us_per_request"]`` is the mean
per request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.applications import Starlette
from starlette.routing import Route

from lmserve_protocols.openai import EmbeddingResponse
from lmserve_protocols.v1 import V1PredictResponse
from lmserve_server.routes.lean import LeanRoute

pytestmark = pytest.mark.benchmark(group="front-end", max_time=0.5, min_rounds=5)

REQUESTS = 200
BODY = json.dumps({"instances": ["I loved this movie, the acting was great."]}).encode()
PATH = "/v1/models/model:predict"


async def _predict(model_name: str, request: Request) -> Response:
    payload = json.loads(await request.body())
    predictions = [1 for _ in payload["instances"]]
    body = V1PredictResponse(predictions=predictions).model_dump_json().encode()
    return Response(body, media_type="application/json")


def _fastapi_app(lean: bool) -> FastAPI:
    app = FastAPI()
    router = APIRouter(route_class=LeanRoute) if lean else APIRouter()
    router.post("/v1/models/{model_name}:predict")(_predict)
    app.include_router(router)
    return app


def _starlette_app() -> Starlette:
    async def endpoint(request: Request) -> Response:
        return await _predict(request.path_params["model_name"], request)

    return Starlette(routes=[Route("/v1/models/{model_name}:predict", endpoint, methods=["POST"])])


async def _call(app: Any) -> int:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(BODY)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


@pytest.mark.parametrize("framework", ["fastapi", "fastapi-leanroute", "starlette"])
def test_predict_route(benchmark: Any, framework: str) -> None:
    app = _starlette_app() if framework == "starlette" else _fastapi_app(framework != "fastapi")
    loop = asyncio.new_event_loop()

    async def many() -> list[int]:
        return [await _call(app) for _ in range(REQUESTS)]

    try:
        # A fresh coroutine per round (a coroutine is awaited once); the warm-up round
        # compiles the routes and runs the lazy imports.
        statuses = benchmark.pedantic(
            lambda: loop.run_until_complete(many()), rounds=10, iterations=1, warmup_rounds=1
        )
    finally:
        loop.close()
    assert statuses == [200] * REQUESTS
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["us_per_request"] = round(stats.stats.mean / REQUESTS * 1e6, 2)
        benchmark.extra_info["us_per_request_best"] = round(stats.stats.min / REQUESTS * 1e6, 2)


def _embedding_response() -> EmbeddingResponse:
    row = [0.0123456789 * (i % 97) for i in range(384)]
    return EmbeddingResponse.model_validate({
        "object": "list", "model": "all-minilm-l6-v2",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i in range(32)],
        "usage": {"prompt_tokens": 320, "total_tokens": 320},
    })  # fmt: skip


@pytest.mark.parametrize("encoder", ["pydantic", "orjson"])
@pytest.mark.parametrize("response", ["v1_predict", "embeddings_32x384"])
def test_response_encoding(benchmark: Any, encoder: str, response: str) -> None:
    model = (
        V1PredictResponse(predictions=[1]) if response == "v1_predict" else _embedding_response()
    )
    if encoder == "pydantic":
        out = benchmark(model.model_dump_json)
        decoded = json.loads(out)
    else:
        out = benchmark(lambda: orjson.dumps(model.model_dump(mode="python")))
        decoded = orjson.loads(out)
    assert decoded == json.loads(model.model_dump_json())
