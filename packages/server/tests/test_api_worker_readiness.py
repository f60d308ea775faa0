"""--api_workers' readiness: no worker says ready until every worker has loaded its model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmserve_server.api_worker import PeersLoaded
from lmserve_server.dataplane import DataPlane
from lmserve_server.metrics import Metrics


def test_ready_only_when_every_worker_has_marked_itself(tmp_path: Path) -> None:
    first, second = PeersLoaded(tmp_path, 0, 2), PeersLoaded(tmp_path, 1, 2)
    first.mark()
    assert not first() and not second()
    second.mark()
    assert first() and second()


def test_a_loaded_worker_is_not_ready_while_a_peer_loads(tmp_path: Path) -> None:
    host: Any = SimpleNamespace(ready=True, check_name=lambda name: None)
    plane = DataPlane(host, Metrics())
    assert plane.ready()  # one process: its own model is all there is
    peers = PeersLoaded(tmp_path, 0, 2)
    plane.peers_loaded = peers
    peers.mark()
    assert not plane.ready() and not plane.model_ready("m")
    PeersLoaded(tmp_path, 1, 2).mark()
    assert plane.ready() and plane.model_ready("m")
