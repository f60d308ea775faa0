"""One HTTP front-end process of ``--api_workers`` (``python -m lmserve_server.api_worker``).

Started by the owner (``lmserve_server.api_workers``), which writes the worker's spec as JSON
on its stdin (the settings carry the API key: no command line that ``ps`` shows). The worker
is an ordinary lmserve app (every route, middleware and limit of ``create_app``) on the
listening socket the owner bound and passed down, with a model host whose encoder runs in the
owner (``forward_channel.RemoteEncoder``): it tokenizes, batches its own requests, sends the
padded tensors, post-processes and answers. It exits 0 after a drain (SIGTERM from the owner),
2 for a bad configuration, 1 when the model never became ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_host import ModelHost
from lmserve_core.settings import ServeSettings
from lmserve_server import event_loop
from lmserve_server.app import create_app
from lmserve_server.forward_channel import RemoteEncoder, forward_endpoint
from lmserve_server.logs import configure_logging
from lmserve_server.metrics import Metrics
from lmserve_server.runner import _serve
from lmserve_server.worker_metrics import PageServer, gather_pages, metrics_endpoint

logger = logging.getLogger("lmserve")

OWNER_CHECK_S = 1.0


class _WorkerTag(logging.Filter):
    """Every line of this process says which worker wrote it (``worker=N`` in text logs, a
    key in JSON logs), so access lines show which process served each request."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


async def _watch_owner(owner: int, remote: RemoteEncoder) -> None:
    """An owner killed outright cannot drain its workers: a worker left behind stops itself,
    failing what waits for the model at once (nothing will answer it) instead of after the
    forward timeout."""
    while os.getppid() == owner:
        await asyncio.sleep(OWNER_CHECK_S)
    logger.error("the model process (pid %d) is gone: stopping", owner)
    await asyncio.to_thread(remote.close)
    os.kill(os.getpid(), signal.SIGTERM)


class PeersLoaded:
    """Whether every worker has loaded its model: each marks itself in the shared work folder
    once it serves (``mark``); readiness waits for all the marks (``DataPlane.peers_loaded``)."""

    def __init__(self, workdir: Path, index: int, workers: int) -> None:
        self._own = workdir / f"loaded-{index}"
        self._marks = [workdir / f"loaded-{i}" for i in range(workers)]
        self._all = False

    def mark(self) -> None:
        self._own.touch()

    def __call__(self) -> bool:
        if not self._all:  # a file check per probe until every worker has loaded
            self._all = all(mark.exists() for mark in self._marks)
        return self._all


def main(spec: dict[str, Any]) -> int:
    index, workers, workdir = int(spec["index"]), int(spec["workers"]), Path(spec["workdir"])
    settings = ServeSettings.model_validate(spec["settings"])
    if index > 0:  # one gRPC listener, in worker 0 (lmserve_server.api_workers says why)
        settings = settings.model_copy(update={"enable_grpc": False})
    configure_logging(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(index))
    listener = socket.socket(fileno=int(spec["fd"]))
    remote = RemoteEncoder(forward_endpoint(workdir))
    metrics = Metrics()
    try:
        host = ModelHost.from_settings(settings, observer=metrics, remote=remote)
    except ConfigurationError as exc:
        print(f"lmserve: error: {exc.message}", file=sys.stderr)
        return 2
    app = create_app(settings, host, metrics)
    peers = PeersLoaded(workdir, index, workers)
    app.state.dataplane.peers_loaded = peers
    pages = PageServer(app.state.dataplane.render_metrics, metrics_endpoint(workdir, index))
    pages.start()
    others = [metrics_endpoint(workdir, i) for i in range(workers) if i != index]

    async def gather(own: bytes) -> bytes:
        return await gather_pages(own, others)

    app.state.gather_metrics = gather
    owner = int(spec["owner_pid"])

    async def load() -> None:
        watcher = asyncio.create_task(_watch_owner(owner, remote))
        app.state.owner_watcher = watcher  # held: a task nobody references may be collected
        try:
            await asyncio.to_thread(remote.wait_until_loaded)
        except asyncio.CancelledError:  # stopped while the owner loads: end the waiting thread
            remote.close()
            raise
        await host.load()
        if host.ready:
            peers.mark()
        if host.loaded is not None:  # metadata shows the device, dtype... of the owner's model
            host.loaded.details = {**remote.details, **host.loaded.details}
        logger.info("API worker %d of %d (pid %d) serving", index, workers, os.getpid())

    try:
        # The owner checked $LMSERVE_EVENT_LOOP before starting us; we inherit its value.
        loop = event_loop.loop_factory()
        return event_loop.run(
            _serve(app, host, settings, sockets=[listener], load_model=load), loop
        )
    finally:
        pages.close()
        remote.close()
        with contextlib.suppress(OSError):
            listener.close()


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.stdin.buffer.read())))
