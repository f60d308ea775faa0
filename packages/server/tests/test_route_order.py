"""The app tries the data-plane routes first, and every request still reaches the route it
reached in registration order."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Match, Route

from lmserve_server.app import data_plane_first
from lmserve_server.routes import generation, health, lora, openai, retrieval, tokenize, v1, v2
from lmserve_server.routes import metrics as metrics_route

ROUTERS = (health, v1, v2, openai, generation, lora, retrieval, tokenize, metrics_route)


def registered_routes() -> list[BaseRoute]:
    app = FastAPI()  # with FastAPI's own docs routes first, as create_app's app has them
    for module in ROUTERS:
        app.include_router(module.router)
    return list(app.router.routes)


def first_full_match(routes: list[BaseRoute], path: str, method: str) -> BaseRoute | None:
    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
    return next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "m", path)


def test_post_routes_come_first_in_their_own_order() -> None:
    before = registered_routes()
    after = data_plane_first(before)
    posts = [r for r in before if "POST" in (getattr(r, "methods", None) or ())]
    assert after[: len(posts)] == posts
    assert sorted(map(id, after)) == sorted(map(id, before))
    assert concrete(getattr(after[0], "path", "")) == "/v1/models/m:predict"


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_every_route_still_answers_its_own_paths(method: str) -> None:
    before = registered_routes()
    after = data_plane_first(before)
    for route in before:
        assert isinstance(route, Route)
        for path in (concrete(route.path), concrete(route.path) + ":predict", "/v1/models/m"):
            assert first_full_match(after, path, method) is first_full_match(before, path, method)
