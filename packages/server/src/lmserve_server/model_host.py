"""One served model's lifecycle: loading -> ready (or failed) -> draining."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum

from lmserve_core.backend import LoadedEncoder, LoadRequest
from lmserve_core.encoder import EncoderService
from lmserve_core.errors import LmserveError, ModelNotFound, ModelNotReady
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_server.plan import ServingPlan, load_backend_factory

logger = logging.getLogger(__name__)


class ModelState(StrEnum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    draining = "draining"


class ModelHost:
    def __init__(self, settings: ServeSettings, plan: ServingPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.name = settings.model_name
        self.state = ModelState.loading
        self.error: str | None = None
        self.loaded: LoadedEncoder | None = None
        self.service: EncoderService | None = None
        self.created = int(time.time())
        self.load_seconds: float | None = None
        # Set by the app: observes instances per forward pass (a metrics histogram).
        self.batch_observer: Callable[[int], None] | None = None

    @property
    def task(self) -> Task:
        return self.plan.task

    @property
    def ready(self) -> bool:
        return self.state is ModelState.ready

    async def load(self) -> None:
        """Load in a worker thread: the event loop keeps answering health checks."""
        started = time.perf_counter()
        try:
            factory = load_backend_factory(self.plan.backend)
            request = LoadRequest(self.settings, self.plan.source, self.plan.task, self.plan.config)
            loaded = await asyncio.to_thread(factory, request)
            service = EncoderService(
                task=self.plan.task,
                tokenizer=loaded.tokenizer,
                backend=loaded.backend,
                info=loaded.info,
                options=loaded.options,
                max_batch_size=self.settings.max_batch_size,
            )
            service.batcher.on_batch = self.batch_observer
            await service.start()
        except LmserveError as exc:
            self._fail(exc.message)
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise
        self.loaded, self.service = loaded, service
        self.load_seconds = time.perf_counter() - started
        self.state = ModelState.ready
        logger.info(
            "model %r ready: %s on the %s backend (%s) in %.1f s",
            self.name, self.task.value, self.plan.backend, self.plan.backend_reason, self.load_seconds,
        )  # fmt: skip

    def _fail(self, message: str) -> None:
        self.state = ModelState.failed
        self.error = message
        logger.error("model %r failed to load: %s", self.name, message)

    async def close(self) -> None:
        self.state = ModelState.draining
        if self.service is not None:
            await self.service.stop()

    def require(self, name: str) -> EncoderService:
        """The service for ``name``, or the error a client should see."""
        if name != self.name:
            raise ModelNotFound(
                f"model {name!r} is not served here (try {self.name!r})", param="model"
            )
        if self.state is ModelState.loading:
            raise ModelNotReady(f"model {name!r} is still loading")
        if self.state is ModelState.draining:
            raise ModelNotReady("the server is shutting down")
        if self.state is ModelState.failed or self.service is None:
            raise ModelNotReady(f"model {name!r} failed to load: {self.error}")
        return self.service

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise ModelNotFound(
                f"model {name!r} is not served here (try {self.name!r})", param="model"
            )
