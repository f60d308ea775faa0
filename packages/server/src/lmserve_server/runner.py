"""Start the server: pre-flight, listen, load the model in the background, exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from fastapi import FastAPI

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_host import ModelHost, ModelState
from lmserve_core.settings import ServeSettings
from lmserve_server import event_loop
from lmserve_server.app import create_app
from lmserve_server.heap import load_then_freeze
from lmserve_server.logs import configure_logging
from lmserve_server.metrics import Metrics

logger = logging.getLogger("lmserve")


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught once serve() returns, which turns a clean
    stop into exit code -2; lmserve handles SIGINT/SIGTERM itself (see ``_Shutdown``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Shutdown:
    """SIGTERM/SIGINT: drain, then stop listening. A second signal stops at once.

    Draining keeps the listeners open so that readiness probes read 503 and new requests get
    a 503 that says why (not a refused connection) while in-flight requests, streams
    included, finish; after ``--shutdown_timeout`` s whatever is left is aborted with an
    error its client can read, and only then does the server close its sockets.
    """

    def __init__(self, server: _Server, host: ModelHost, timeout: float) -> None:
        self.server = server
        self.host = host
        self.timeout = timeout
        self.task: asyncio.Task[None] | None = None

    def on_signal(self) -> None:
        if self.task is not None:  # the second signal: no more waiting
            logger.warning("second stop signal: exiting now")
            self.task.cancel()
            self.server.should_exit = self.server.force_exit = True
            return
        self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self.host.drain(self.timeout)  # the listeners stay open meanwhile
        self.server.should_exit = True


def _disable_loaded_progress_bars() -> None:
    """The variable above is read when transformers and the hub are imported: where a process
    imported them already (an embedding application, a test's pre-imported fork), switch their
    bars off directly. Neither is imported here for it."""
    for module_name, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                                ("transformers.utils.logging", "disable_progress_bar")):  # fmt: skip
        module = sys.modules.get(module_name)
        if module is not None:
            getattr(module, switch)()


def run(settings: ServeSettings) -> int:
    """Returns the process exit code: 0 clean stop, 1 model failed, 2 bad configuration."""
    configure_logging(settings.log_level, settings.log_format)
    if settings.log_format == "json":
        # Every stderr line a JSON object: no tqdm bars (transformers, the hub) and vLLM's
        # loggers through ours rather than its own handler. Set before either is imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        _disable_loaded_progress_bars()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("SAFETENSORS_FAST_GPU", "1")
    metrics = Metrics()
    try:
        loop = event_loop.loop_factory()
        host = ModelHost.from_settings(settings, observer=metrics)
    except ConfigurationError as exc:
        print(f"lmserve: error: {exc.message}", file=sys.stderr)
        return 2
    plan = host.plan
    logger.info(
        "serving %s as %r: task %s, backend %s (%s)",
        plan.source.display_name, host.name, plan.task.value, plan.backend, plan.backend_reason,
    )  # fmt: skip
    if settings.api_workers > 1:  # the model here, HTTP in worker processes
        from lmserve_server.api_workers import serve_with_workers

        return event_loop.run(serve_with_workers(host, settings), loop)
    app = create_app(settings, host, metrics)
    return event_loop.run(_serve(app, host, settings), loop)


async def _serve(
    app: FastAPI,
    host: ModelHost,
    settings: ServeSettings,
    *,
    sockets: list[socket.socket] | None = None,
    load_model: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """``sockets``: listen on these (an API worker's, bound by the owner) instead of binding
    --host:--http_port; ``load_model``: how the model loads (default ``host.load``; an API
    worker first waits for the owner's model)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,  # lmserve logs each request itself (lmserve_server.access)
        # lmserve drains before uvicorn stops (``_Shutdown``): only stragglers are left here.
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    shutdown = _Shutdown(server, host, settings.shutdown_timeout)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.on_signal)

    async def load() -> None:
        try:
            await load_then_freeze(load_model or host.load)
        except ConfigurationError as exc:
            print(f"lmserve: error: {exc.message}", file=sys.stderr)
            server.should_exit = True
        except Exception:
            logger.exception("model failed to load")
            server.should_exit = True

    grpc_server = None
    if settings.enable_grpc:  # before loading: a port in use fails at once, naming the flag
        from lmserve_server.grpc_service import start_grpc_server

        try:
            grpc_server = await start_grpc_server(
                app.state.dataplane, settings.host, settings.grpc_port,
                max_message_bytes=settings.max_request_body_bytes, api_key=settings.api_key,
            )  # fmt: skip
        except ConfigurationError as exc:
            print(f"lmserve: error: {exc.message}", file=sys.stderr)
            return 2
    loader = asyncio.create_task(load())
    try:
        await server.serve(sockets=sockets)
    finally:
        if shutdown.task is not None and not shutdown.task.done():
            shutdown.task.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        if not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loader
        await host.close()
    return 1 if host.state is ModelState.failed or (host.error is not None) else 0
