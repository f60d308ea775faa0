"""LeanRoute: endpoints called directly with the request and path parameters, still in OpenAPI."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel

from lmserve_core.errors import InvalidInput
from lmserve_server.errors import install_error_handlers
from lmserve_server.routes.lean import LeanRoute


def _app() -> FastAPI:
    router = APIRouter(route_class=LeanRoute)

    @router.get("/")
    async def root() -> Response:
        return Response(b"root")

    @router.post("/m/{model_name}/infer")
    @router.post("/m/{model_name}/versions/{model_version}/infer")
    async def infer(
        model_name: str, request: Request, model_version: str | None = None
    ) -> Response:
        body = await request.body()
        if body == b"bad":
            raise InvalidInput("bad body", param="instances")
        return Response(f"{model_name}|{model_version}|{body.decode()}".encode())

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    return app


def test_path_parameters_body_and_errors_reach_the_endpoint() -> None:
    app = _app()
    asyncio.run(_requests(app))
    paths = app.openapi()["paths"]
    assert "/m/{model_name}/infer" in paths
    assert "/m/{model_name}/versions/{model_version}/infer" in paths


async def _requests(app: FastAPI) -> None:
    lean = {type(r).__name__ for r in app.routes if getattr(r, "path", "").startswith("/m")}
    assert lean == {"LeanRoute"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).text == "root"
        assert (await client.post("/m/a/infer", content=b"x")).text == "a|None|x"
        assert (await client.post("/m/a/versions/2/infer", content=b"y")).text == "a|2|y"
        refused = await client.post("/m/a/infer", content=b"bad")
        assert refused.status_code == 400 and "bad body" in refused.text
    paths = app.openapi()["paths"]
    assert (
        "/m/{model_name}/infer" in paths
        and "/m/{model_name}/versions/{model_version}/infer" in paths
    )


class _Body(BaseModel):
    text: str


def test_endpoints_fastapi_would_have_to_solve_are_refused() -> None:
    router = APIRouter(route_class=LeanRoute)

    async def body_model(body: _Body, request: Request) -> Response:
        return Response()

    async def query_param(model_name: str, request: Request, limit: str) -> Response:
        return Response()

    def not_async(request: Request) -> Response:
        return Response()

    with pytest.raises(TypeError, match="not body"):
        router.post("/a")(body_model)
    with pytest.raises(TypeError, match="not limit"):
        router.post("/b/{model_name}")(query_param)
    with pytest.raises(TypeError, match="async def"):
        router.post("/c")(not_async)
