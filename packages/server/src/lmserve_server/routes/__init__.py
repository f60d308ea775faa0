"""The HTTP routes: each parses its protocol, calls the data plane and answers with an
lmserve-protocols model."""

from __future__ import annotations

from fastapi import Request, Response
from pydantic import BaseModel

from lmserve_protocols.wire import json_bytes
from lmserve_server.dataplane import DataPlane


def plane(request: Request) -> DataPlane:
    """The data plane of the app serving ``request``."""
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    """``body`` serialised once, by pydantic. Returned as a model instead, FastAPI would
    validate it again and walk every value through ``jsonable_encoder`` (an embedding has
    hundreds of floats; ``json.dumps`` of them is ten times slower than pydantic's)."""
    return Response(json_bytes(body), status_code=status_code, media_type="application/json")
