"""The official ``openai`` SDK against lmserve test servers: one client per server, closed by
``close_openai_clients()`` (the conftest does it when each test module ends). A client left to
the garbage collector closes its pooled sockets in whatever order it finds them, and the
ResourceWarning that follows is an error in this suite."""

from __future__ import annotations

import openai

from _support.servers import ServerProcess

_CLIENTS: dict[tuple[str, float], openai.OpenAI] = {}


def openai_client(server: ServerProcess, *, timeout: float = 120) -> openai.OpenAI:
    key = (server.url, timeout)
    if key not in _CLIENTS:
        _CLIENTS[key] = openai.OpenAI(
            base_url=server.url + "/openai/v1", api_key="unused", max_retries=0, timeout=timeout
        )
    return _CLIENTS[key]


def close_openai_clients() -> None:
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()
