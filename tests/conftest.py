"""Fixtures shared by the integration tests: real models and real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from _support.sdk import close_openai_clients
from _support.servers import ServerProcess, start_server
from _support.tiny_models import model_path
from _support.vllm_reference import start_vllm_reference


@pytest.fixture(scope="module", autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """Each module's openai SDK clients are closed when it ends (see _support/sdk.py)."""
    yield
    close_openai_clients()


class ServerPool:
    """Each distinct server configuration started once and shared between tests and modules.

    Memory is bounded: when a module ends, the servers that neither it nor the module before
    it asked for are stopped (one is started again if a later module asks). A session-long
    pool of every configuration ran this 24 GiB machine out of memory once vLLM engines
    (each ~2 GiB with its workers) were among them.
    """

    def __init__(self) -> None:
        self.servers: dict[tuple[str, ...], ServerProcess] = {}
        self.used: set[tuple[str, ...]] = set()
        self.used_before: set[tuple[str, ...]] = set()

    def get(self, *args: str) -> ServerProcess:
        key = tuple(args)
        self.used.add(key)
        if key not in self.servers or self.servers[key].proc.poll() is not None:
            self.servers[key] = start_server(list(args))
        return self.servers[key]

    def end_module(self) -> None:
        keep = self.used | self.used_before
        for key in [k for k in self.servers if k not in keep]:
            self.servers.pop(key).stop()
        self.used_before, self.used = self.used, set()

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()


@pytest.fixture(scope="session")
def _pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="module", autouse=True)
def _bound_the_pool(_pool: ServerPool) -> Iterator[None]:
    yield
    _pool.end_module()


@pytest.fixture(scope="session")
def server_pool(_pool: ServerPool) -> Callable[..., ServerProcess]:
    """Start each distinct server configuration once and share it (see ServerPool)."""
    return _pool.get


@pytest.fixture(scope="session")
def llama_reference() -> Iterator[ServerProcess]:
    """vLLM's own server on the tiny Llama with its defaults, started once for the modules that
    compare against it (test_tokenize_e2e, test_vllm_conformance_e2e): each vLLM start here
    imports torch and vLLM twice, over a minute of the suite's 90."""
    server = start_vllm_reference(model_path("llama"))
    yield server
    server.stop()
