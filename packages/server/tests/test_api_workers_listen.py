"""--api_workers' listening sockets: one per worker on the same port, a taken port refused."""

from __future__ import annotations

import socket

import pytest

from lmserve_core.errors import ConfigurationError
from lmserve_server.api_workers import bind_listeners


def test_one_socket_per_worker_on_one_port() -> None:
    sockets = bind_listeners("127.0.0.1", 0, 3)  # port 0: the first picks, the others join
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(sockets) == 3 and len(ports) == 1
        assert all(s.get_inheritable() for s in sockets)
        # A client reaches one of them.
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass
    finally:
        for s in sockets:
            s.close()


def test_a_port_something_else_listens_on_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"--http_port {port}") as info:
            bind_listeners("127.0.0.1", port, 2)
    assert info.value.param == "http_port"


def test_a_reuseport_listener_is_not_joined_silently() -> None:
    """Another server that also sets SO_REUSEPORT (an lmserve with workers) is in the way too."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(ConfigurationError, match="cannot listen"):
            bind_listeners("127.0.0.1", other.getsockname()[1], 2)
