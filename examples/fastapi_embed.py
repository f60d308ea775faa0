"""Your own FastAPI application with lmserve's routes mounted under /lm and the model loaded
by your application's lifespan (lmserve_server.build).

    uv run --no-sync python examples/fastapi_embed.py \
        --model_dir "$(uv run --no-sync python examples/tiny_model.py sentiment)" --port 8000
    uv run --no-sync python examples/fastapi_embed.py --model_id all-minilm-l6-v2   # built in

    curl -s http://127.0.0.1:8000/hello                       # your route
    curl -s http://127.0.0.1:8000/lm/v2/health/ready          # lmserve's, under /lm
    curl -s http://127.0.0.1:8000/lm/v1/models/model:predict -d '{"instances": ["i love it"]}'
    curl -s http://127.0.0.1:8000/predict -H 'content-type: application/json' \
        -d '{"texts": ["i love it", "i hate it"]}'           # your route using the model

Starlette never runs a mounted application's lifespan, so the parent's lifespan enters
``lm.lifespan()``: the server starts listening once the model is ready, and Ctrl-C closes it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from lmserve_server import LmserveApp, ServeSettings, build


class PredictBody(BaseModel):
    texts: list[str]


def make_app(lm: LmserveApp, prefix: str = "/lm") -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with lm.lifespan():  # loads the model; drains and closes it at shutdown
            # Your routes reach the model in-process, through lmserve's own API (no network).
            transport = httpx.ASGITransport(app=lm.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://lmserve") as c:
                app.state.lmserve = c
                yield

    app = FastAPI(title="my application", lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, Any]:
        return {"hello": "from my application", "model": lm.model_name,
                "task": lm.task.value, "model_ready": lm.ready}  # fmt: skip

    @app.post("/predict")
    async def predict(body: PredictBody) -> dict[str, Any]:
        client: httpx.AsyncClient = app.state.lmserve
        r = await client.post(f"/v1/models/{lm.model_name}:predict",
                              json={"instances": body.texts})  # fmt: skip
        r.raise_for_status()
        return {"texts": body.texts, "predictions": r.json()["predictions"]}

    app.mount(prefix, lm.app)  # /lm/v1/..., /lm/v2/..., /lm/openai/v1/..., /lm/metrics
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", help="a saved Hugging Face model")
    p.add_argument("--model_id", help="a hub id or built-in name (all-minilm-l6-v2)")
    p.add_argument("--model_name", default="model")
    p.add_argument("--task", default=None, help="inferred from the model when absent")
    p.add_argument("--prefix", default="/lm")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    if not (args.model_dir or args.model_id):
        p.error("name the model with --model_dir or --model_id")
    settings = ServeSettings(model_dir=args.model_dir, model_id=args.model_id,
                             model_name=args.model_name, task=args.task)  # fmt: skip
    lm = build(settings)  # plans (files, task, backend) now; loads in the lifespan
    uvicorn.run(make_app(lm, args.prefix), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
