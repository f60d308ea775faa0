"""The HTTP routes: each parses its protocol, calls the data plane and shapes the response."""

from __future__ import annotations

from fastapi import Request

from lmserve_server.dataplane import DataPlane


def plane(request: Request) -> DataPlane:
    """The data plane of the app serving ``request``."""
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane
