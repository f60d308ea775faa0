"""``LeanRoute``: a FastAPI route that calls its endpoint directly, for the hot data-plane routes.

FastAPI's own request handler solves the endpoint's parameters as dependencies and opens two
exit stacks for them on every request: ~50 µs per request on this CPU, against ~30 µs for a
whole plain Starlette route (``benchmarks/micro/test_front_end.py``). For a tiny encoder the
front end is most of a request's cost. Endpoints whose parameters are only path parameters and
the ``Request`` (they read and check the body themselves) need none of that, so a LeanRoute
runs them as a Starlette route would while FastAPI still documents them: the OpenAPI schema,
``responses`` and ``openapi_extra`` are the APIRoute's, unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.routing import request_response

Endpoint = Callable[..., Coroutine[Any, Any, Response]]


class LeanRoute(APIRoute):
    """An APIRoute for ``async def endpoint(<path params: str>, request: Request) -> Response``
    (``request`` optional; path parameters absent from a route's path take their defaults)."""

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any) -> None:
        _check_lean(path, endpoint)
        super().__init__(path, endpoint, **kwargs)
        target = endpoint
        if "request" in inspect.signature(endpoint).parameters:

            async def handler(request: Request) -> Response:
                return await target(request=request, **request.path_params)
        else:

            async def handler(request: Request) -> Response:
                return await target(**request.path_params)

        # Starlette's request_response: exception handlers apply as for any route.
        self.app = request_response(handler)


def _check_lean(path: str, endpoint: Endpoint) -> None:
    """Refuse at import an endpoint this route would call wrongly (a body model, a query
    parameter, a dependency): FastAPI would have solved those."""
    name = endpoint.__qualname__
    if not inspect.iscoroutinefunction(endpoint):
        raise TypeError(f"{name}: a LeanRoute endpoint is an async def")
    for param_name, param in inspect.signature(endpoint).parameters.items():
        if param_name == "request":
            continue
        in_path = "{" + param_name + "}" in path
        if param.annotation not in ("str", "str | None") or not (in_path or param.default is None):
            raise TypeError(
                f"{name}: a LeanRoute endpoint takes `request` and path parameters (str; one "
                f"absent from {path!r} defaults to None), not {param_name}: {param.annotation}"
            )
