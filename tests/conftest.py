"""Fixtures shared by the integration tests: real models and real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from _support.sdk import close_openai_clients
from _support.servers import ServerProcess, start_server


@pytest.fixture(scope="module", autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """Each module's openai SDK clients are closed when it ends (see _support/sdk.py)."""
    yield
    close_openai_clients()


@pytest.fixture(scope="session")
def server_pool() -> Iterator[Callable[..., ServerProcess]]:
    """Start each distinct server configuration once per session and share it."""
    servers: dict[tuple[str, ...], ServerProcess] = {}

    def get(*args: str) -> ServerProcess:
        key = tuple(args)
        if key not in servers or servers[key].proc.poll() is not None:
            servers[key] = start_server(list(args))
        return servers[key]

    yield get
    for server in servers.values():
        server.stop()
