"""Models from plain Python, no server: ``load_model(path)`` returns an :class:`EncoderModel`
(``predict``) or a :class:`GeneratorModel` (``complete``, ``chat``, ``generate``).

The same pipeline as ``lmserve serve`` (core's tasks, dynamic batcher and OpenAI layer on this
package's backends), driven from a private event loop on a daemon thread so that the calls are
plain blocking functions. torch and transformers are imported by ``load_model``, not before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lmserve_core.encoder import EncoderResult, EncoderService
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_core.model_host import ModelHost
from lmserve_core.settings import Backend, ServeSettings
from lmserve_core.tasks import Task
from lmserve_protocols.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)

T = TypeVar("T")


class _LoopThread:
    """An event loop running on its own daemon thread; ``run`` blocks for one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="lmserve-library", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Model:
    def __init__(self, host: ModelHost, loop: _LoopThread) -> None:
        self.host = host
        self.name = host.name
        self.task = host.task
        self._loop = loop

    def close(self) -> None:
        """Drain and stop the model (as ``lmserve serve`` on SIGTERM), then its event loop.
        Idempotent."""
        if not self._loop.loop.is_closed():
            self._loop.run(self.host.drain(self.host.settings.shutdown_timeout))
            self._loop.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EncoderModel(_Model):
    """An encoder (sequence or token classification, fill-mask, embeddings) in this process.

    Requests from several threads are merged into batches by core's ``DynamicBatcher``, with
    the server's batching settings (``max_batch_size``, ``max_batch_tokens``, ...).
    """

    @property
    def service(self) -> EncoderService:
        return self.host.require(self.name)

    def predict(
        self, instances: Sequence[str], parameters: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """What ``POST /v1/models/{name}:predict`` answers in ``predictions``, one per text."""
        return self.infer(instances, parameters).predictions

    def infer(
        self, instances: Sequence[str], parameters: Mapping[str, Any] | None = None
    ) -> EncoderResult:
        """Both result shapes: V1 ``predictions`` and V2 ``outputs`` (numpy tensors)."""
        return self._loop.run(self.service.infer(list(instances), parameters))


class GeneratorModel(_Model):
    """A generative model (decoder-only or encoder-decoder) in this process; requests from
    several threads share the continuous-batching engine."""

    @property
    def service(self) -> OpenAIGenerationService:
        return self.host.require_generator(self.name)

    def complete(self, prompt: str | list[str], **fields: Any) -> CompletionResponse:
        """An OpenAI completion response; ``fields`` are the request's other fields
        (``max_tokens``, ``temperature``, ``stop``, ``seed``, ``n``, ``logprobs``, ...)."""
        service = self.service
        request = CompletionRequest(model=self.name, prompt=prompt, **fields)
        prepared = service.prepare_completion(request)
        response = self._loop.run(service.complete(prepared))
        assert isinstance(response, CompletionResponse)
        return response

    def chat(self, messages: Sequence[Mapping[str, Any]], **fields: Any) -> ChatCompletionResponse:
        """An OpenAI chat completion response, the model's chat template applied."""
        service = self.service
        request = ChatCompletionRequest.model_validate(
            {"model": self.name, "messages": list(messages), **fields}
        )
        prepared = service.prepare_chat(request)
        response = self._loop.run(service.complete(prepared))
        assert isinstance(response, ChatCompletionResponse)
        return response

    def generate(self, prompt: str, **fields: Any) -> str:
        """The text that continues ``prompt`` (the first choice of :meth:`complete`)."""
        return self.complete(prompt, **fields).choices[0].text


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    task: str | Task | None = None,
    **settings: Any,
) -> EncoderModel | GeneratorModel:
    """Load ``model`` (a local directory, a built-in name or a hub id; default: the built-in
    default model) on the Hugging Face backend.

    ``task`` is inferred from the model's architecture unless given. ``settings`` are
    :class:`lmserve_core.ServeSettings` fields, as the ``lmserve serve`` flags of the same
    names (``dtype``, ``max_length``, ``max_batch_size``, ``return_probabilities``, ...). The
    model goes through the server's own lifecycle (``lmserve_core.model_host.ModelHost``):
    the same source and task resolution, loading, batching settings and draining on close.
    """
    values = dict(settings)
    if model is not None:
        key = "model_dir" if Path(model).expanduser().is_dir() else "model_id"
        values[key] = os.fspath(model)
    if task is not None:
        values["task"] = task
    values["backend"] = Backend.huggingface
    host = ModelHost.from_settings(ServeSettings(**values))
    loop = _LoopThread()
    try:
        loop.run(host.load())
    except BaseException:
        with contextlib.suppress(Exception):
            loop.run(host.close())
        loop.close()
        raise
    if host.task.is_generative:
        return GeneratorModel(host, loop)
    return EncoderModel(host, loop)
