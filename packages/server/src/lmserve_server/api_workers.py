"""``--api_workers N``: N HTTP front-end processes around the one process that holds the model.

The process ``lmserve serve`` starts (the owner) binds --host:--http_port (one SO_REUSEPORT
socket per worker, see ``bind_listeners``), loads the model as usual and, instead of serving
HTTP, answers forward passes over a ZeroMQ IPC socket (``forward_channel``). N workers
(``api_worker``, fresh interpreters: nothing is forked after torch is imported) each inherit
one of the listening sockets, so the kernel hands each connection to one of them, and do all
the per-request work: parsing, validation, tokenization, batching, response encoding. One core for the front end was the limit on small encoders (BENCHMARKS.md).

- Health: a worker is ready once the owner's model is loaded (and while it answers).
- Metrics: any worker's ``/metrics`` adds up every worker's series (``worker_metrics``).
- gRPC: worker 0 alone listens on --grpc_port. grpc cannot adopt an inherited socket, and
  letting each worker bind it with SO_REUSEPORT would also let an unrelated server share it
  silently (lmserve turns it off so that a port in use fails at start, naming the flag).
- Shutdown: SIGTERM/SIGINT here is passed to every worker, which drains as one server does
  (readiness and new requests 503, in-flight requests finish, forward passes still run here);
  the owner exits 0 once every worker has. A second signal is passed on too (stop now).
  A worker that exits on its own is logged and stops the rest: the owner exits non-zero
  (2 when the worker's was a configuration error, else 1), never serving with fewer workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_host import ModelHost
from lmserve_core.settings import ServeSettings
from lmserve_server.forward_channel import ForwardServer, forward_endpoint
from lmserve_server.heap import load_then_freeze

logger = logging.getLogger("lmserve")

# Beyond --shutdown_timeout, what a draining worker may take to close its listeners.
STOP_GRACE_S = 15.0


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker on --host:--http_port, all bound here.

    They share the port through SO_REUSEPORT, so the kernel spreads connections evenly over
    the workers. One socket shared by all spreads them badly: the worker that wakes first
    accepts every connection waiting, and a client's keep-alive connections stay where they
    landed (32 connections opened at once went 25 to one worker, 7 to the other). A first
    bind without SO_REUSEPORT makes a port that anything else listens on fail at start, as
    with one process, instead of being silently shared."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(probe, host, port)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _bind(sock, host, port)
            port = sock.getsockname()[1]  # --http_port 0: the others join the port it got
            sock.listen(2048)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigurationError(
            f"--http_port {port}: cannot listen on {host}:{port} ({exc.strerror})",
            param="http_port",
        ) from None


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


async def start_worker(
    index: int, settings: ServeSettings, listener: socket.socket, workdir: Path
) -> Worker:
    """Worker ``index`` on ``listener`` (its own socket on the shared port)."""
    spec = {
        "index": index,
        "workers": settings.api_workers,
        "workdir": str(workdir),
        "fd": listener.fileno(),
        "owner_pid": os.getpid(),
        "settings": settings.model_dump(mode="json"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmserve_server.api_worker",
        stdin=asyncio.subprocess.PIPE, pass_fds=(listener.fileno(),),
        # Its own process group: a terminal's Ctrl-C reaches the owner only, which passes it
        # on once (twice would be "stop now" to a worker).
        start_new_session=True,
    )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(json.dumps(spec).encode())
    await process.stdin.drain()
    process.stdin.close()
    return Worker(index, process)


class _Supervisor:
    """Starts nothing itself: watches the workers and the model load, passes signals on."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.workers: list[Worker] = []
        self.stop_requested = asyncio.Event()
        self.signals = 0

    def on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            logger.info("stopping: draining %d API workers", len(self.workers))
        else:
            logger.warning("second stop signal: the API workers stop now")
        for worker in self.workers:
            worker.send(signal.SIGTERM)
        self.stop_requested.set()

    async def run(self, loader: asyncio.Task[None]) -> int:
        exits: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(w.process.wait()): w for w in self.workers
        }
        stop = asyncio.ensure_future(self.stop_requested.wait())
        pending: set[asyncio.Future[Any]] = {*exits, stop, loader}
        code = 0
        while not self.stop_requested.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if loader in done and loader.exception() is not None:
                exc = loader.exception()
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                logger.error("model failed to load: %s; stopping the API workers", message)
                code = 1
                break
            dead = [exits[f] for f in done if f in exits]
            if dead:
                worker = dead[0]
                returncode = worker.process.returncode
                logger.error(
                    "API worker %d (pid %d) exited with code %s: stopping the others",
                    worker.index, worker.pid, returncode,
                )  # fmt: skip
                code = 2 if returncode == 2 else 1
                break
        if not self.stop_requested.is_set():  # a failure, not a signal: stop the rest now
            self.on_signal()
        stop.cancel()
        timeout = self.settings.shutdown_timeout + STOP_GRACE_S
        done, _ = await asyncio.wait(exits, timeout=timeout)
        for future, worker in exits.items():
            if future not in done:
                logger.error("API worker %d (pid %d) did not stop: killing it", worker.index,
                             worker.pid)  # fmt: skip
                worker.send(signal.SIGKILL)
                await worker.process.wait()
                code = code or 1
            elif worker.process.returncode != 0 and code == 0:
                logger.error("API worker %d (pid %d) exited with code %s", worker.index,
                             worker.pid, worker.process.returncode)  # fmt: skip
                code = 1
        return code


async def serve_with_workers(host: ModelHost, settings: ServeSettings) -> int:
    """Returns the exit code: 0 after a clean stop, 1 when the model or a worker failed, 2 for
    a bad configuration (the port taken, or a worker's)."""
    try:
        listeners = bind_listeners(settings.host, settings.http_port, settings.api_workers)
    except ConfigurationError as exc:
        print(f"lmserve: error: {exc.message}", file=sys.stderr)
        return 2
    # Private to this user (mkdtemp: 0700): the channel carries every request's tokens.
    workdir = Path(tempfile.mkdtemp(prefix="lmserve-api-workers-"))
    forward = ForwardServer(host, forward_endpoint(workdir))
    forward.details = {"api_workers": settings.api_workers}
    supervisor = _Supervisor(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.on_signal)
    loader: asyncio.Task[None] | None = None
    try:
        forward.start()
        loader = asyncio.create_task(load_then_freeze(host.load))
        for index, listener in enumerate(listeners):
            supervisor.workers.append(await start_worker(index, settings, listener, workdir))
            listener.close()  # the worker holds it now; this process never accepts
        logger.info(
            "serving on %s:%d through %d API workers (pids %s)", settings.host,
            settings.http_port, len(supervisor.workers),
            ", ".join(str(w.pid) for w in supervisor.workers),
        )  # fmt: skip
        code = await supervisor.run(loader)
    finally:
        for listener in listeners:
            with contextlib.suppress(OSError):
                listener.close()
        if loader is not None and not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loader
        await forward.close()
        await host.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if code == 0 and host.error is not None:
        code = 1
    return code
