"""lmserve inside your own FastAPI (or any ASGI) application.

::

    from contextlib import asynccontextmanager
    from fastapi import FastAPI
    from lmserve_server import ServeSettings, build

    lm = build(ServeSettings(model_dir="/models/sst2", task="sequence_classification"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with lm.lifespan():  # loads the model; closes it on the way out
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/lm", lm.app)  # /lm/v1/models/model:predict, /lm/v2/..., /lm/openai/v1/...

Why a mounted sub-application and not an ``APIRouter``: lmserve's routes come with their own
state (the model host, metrics), error handlers (KServe and OpenAI error bodies) and middleware
(request ids and access log, API key, body size limit, CORS); a mounted app keeps all of them
and leaves the parent's alone. Mount it at ``"/"`` after your own routes to serve lmserve's URLs
unprefixed.

Why the parent enters ``lm.lifespan()``: Starlette runs the lifespan of the application it
serves, never those of mounted sub-applications, so the model would never load. Served on its
own (``uvicorn.run(lm.app)``), the sub-application runs the same lifespan itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_host import ModelHost, ModelState
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_server.app import create_app
from lmserve_server.metrics import Metrics

logger = logging.getLogger("lmserve")


class LmserveApp:
    """One served model: the ASGI application answering lmserve's routes, and the lifespan
    that loads the model and closes it. Made by :func:`build`; each is used once (enter its
    lifespan one time)."""

    def __init__(self, settings: ServeSettings, host: ModelHost, app: FastAPI) -> None:
        self.settings = settings
        #: The model's lifecycle (state, readiness, the loaded backend): for advanced use.
        self.host = host
        #: The FastAPI application with lmserve's routes: mount it, or serve it on its own.
        self.app = app
        self._used = False
        self._loader: asyncio.Task[None] | None = None
        self._grpc: Any = None
        # Served on its own, the sub-application loads the model in its own lifespan.
        app.router.lifespan_context = self.lifespan

    @property
    def model_name(self) -> str:
        """The name in lmserve's URLs and in the OpenAI ``model`` field."""
        return self.settings.model_name

    @property
    def task(self) -> Task:
        return self.host.task

    @property
    def backend(self) -> str:
        """The backend serving the model (``huggingface``, ``vllm``, ``onnx``, ``triton``)."""
        return self.host.backend_name

    @property
    def ready(self) -> bool:
        """True once the model answers (the same test as ``/v2/health/ready``)."""
        return self.host.ready

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None, *, wait: bool = True) -> AsyncIterator[None]:
        """Load the model on entry and close it on exit; enter it from your app's lifespan.

        ``app`` is ignored: it lets ``FastAPI(lifespan=lm.lifespan)`` use this directly when
        lmserve is all your lifespan does. With ``wait=True`` (the default) entry returns once
        the model is ready and raises if it cannot load, so your server starts only with a
        working model. With ``wait=False`` it loads in the background: readiness answers 503
        until the model is ready (or stays 503, with the error in the log, if it fails), as
        ``lmserve serve`` does.
        """
        await self.start(wait=wait)
        try:
            yield
        finally:
            await self.stop()

    async def start(self, *, wait: bool = True) -> None:
        """Load the model (see :meth:`lifespan`, which pairs this with :meth:`stop`)."""
        if self._used:
            raise RuntimeError(
                "this LmserveApp was started already; build() another one to serve again"
            )
        self._used = True
        if self.settings.enable_grpc and "enable_grpc" in self.settings.model_fields_set:
            # Only when asked: an app mounted in the user's opens no second port by itself
            # (``lmserve serve`` serves gRPC by default, as KServe).
            from lmserve_server.grpc_service import start_grpc_server

            s = self.settings
            self._grpc = await start_grpc_server(
                self.app.state.dataplane, s.host, s.grpc_port,
                max_message_bytes=s.max_request_body_bytes, api_key=s.api_key,
            )  # fmt: skip
        if wait:
            try:
                await self.host.load()
            except BaseException:
                await self.stop()
                raise
            return
        self._loader = asyncio.get_running_loop().create_task(self._load_in_background())

    async def _load_in_background(self) -> None:
        try:
            await self.host.load()
        except Exception:  # the host keeps the reason: readiness stays 503 and says why
            logger.exception("model %r failed to load", self.model_name)

    async def stop(self) -> None:
        """Drain (readiness and new requests 503; in-flight ones get up to
        ``shutdown_timeout`` s), then close the model. Idempotent."""
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader
        if self.host.state is ModelState.ready:
            await self.host.drain(self.settings.shutdown_timeout)
        if self._grpc is not None:
            grpc, self._grpc = self._grpc, None
            await grpc.stop(grace=5)
        await self.host.close()

    def __repr__(self) -> str:
        return (
            f"LmserveApp(model_name={self.model_name!r}, task={self.task.value!r}, "
            f"backend={self.backend!r}, state={self.host.state.value!r})"
        )


def build(settings: ServeSettings | None = None, /, **fields: Any) -> LmserveApp:
    """Plan one model's serving (files, task, backend) and build its application; nothing
    loads until its lifespan is entered.

    ``settings`` are the ``lmserve serve`` flags as a :class:`ServeSettings`; keyword
    ``fields`` build one (``build(model_dir="...", task="fill_mask")``) or override those of
    ``settings``. ``host``, ``http_port`` and the logging settings are your server's business
    and are not used here; ``enable_grpc=True``, given explicitly, starts lmserve's gRPC
    listener on ``grpc_port`` with the lifespan (unlike ``lmserve serve``, an app mounted in
    yours opens no second port by default).

    Raises :class:`lmserve_core.errors.ConfigurationError` (a missing model directory, an
    unknown task, a backend that is not installed, ...) before anything is loaded.
    """
    if settings is None:
        settings = ServeSettings(**fields)
    elif fields:
        settings = ServeSettings(**{**settings.model_dump(exclude_unset=True), **fields})
    if settings.api_workers > 1:  # processes of lmserve's own; an embedded app is one of yours
        raise ConfigurationError(
            f"api_workers={settings.api_workers}: worker processes are `lmserve serve`'s; "
            "run your own server's workers instead", param="api_workers",
        )  # fmt: skip
    metrics = Metrics()
    host = ModelHost.from_settings(settings, observer=metrics)
    plan = host.plan
    logger.info(
        "embedding %s as %r: task %s, backend %s (%s)",
        plan.source.display_name, host.name, plan.task.value, plan.backend, plan.backend_reason,
    )  # fmt: skip
    return LmserveApp(settings, host, create_app(settings, host, metrics))
