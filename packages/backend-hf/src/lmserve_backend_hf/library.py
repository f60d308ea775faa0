"""Models from plain Python, no server: ``load_model(path)`` returns an :class:`EncoderModel`
(``predict``) or a :class:`GeneratorModel` (``complete``, ``chat``, ``generate``).

The same pipeline as ``lmserve serve`` (core's tasks, dynamic batcher and OpenAI layer on this
package's backends), driven from a private event loop on a daemon thread so that the calls are
plain blocking functions. torch and transformers are imported by ``load_model``, not before.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lmserve_core.backend import LoadedGenerator, LoadRequest
from lmserve_core.encoder import EncoderResult, EncoderService
from lmserve_core.generation.prepare import GenerationLimits
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_core.model_files import is_sentence_transformer, resolve_model_source
from lmserve_core.settings import Backend, ServeSettings
from lmserve_core.tasks import Task, infer_task
from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest

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
    def __init__(self, name: str, task: Task, loop: _LoopThread) -> None:
        self.name = name
        self.task = task
        self._loop = loop

    async def _stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the model and its event loop (idempotent)."""
        if not self._loop.loop.is_closed():
            self._loop.run(self._stop())
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

    Requests from several threads are merged into batches by core's ``DynamicBatcher``.
    """

    def __init__(self, service: EncoderService, name: str, loop: _LoopThread) -> None:
        super().__init__(name, service.task, loop)
        self.service = service

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

    async def _stop(self) -> None:
        await self.service.stop()


class GeneratorModel(_Model):
    """A generative model (decoder-only or encoder-decoder) in this process; requests from
    several threads share the continuous-batching engine."""

    def __init__(self, service: OpenAIGenerationService, name: str, task: Task, loop: _LoopThread):
        super().__init__(name, task, loop)
        self.service = service

    def complete(self, prompt: str | list[str], **fields: Any) -> dict[str, Any]:
        """An OpenAI completion response body; ``fields`` are the request's other fields
        (``max_tokens``, ``temperature``, ``stop``, ``seed``, ``n``, ``logprobs``, ...)."""
        request = CompletionRequest(model=self.name, prompt=prompt, **fields)
        prepared = self.service.prepare_completion(request)
        return self._loop.run(self.service.complete(prepared))

    def chat(self, messages: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
        """An OpenAI chat completion response body, the model's chat template applied."""
        request = ChatCompletionRequest.model_validate(
            {"model": self.name, "messages": list(messages), **fields}
        )
        prepared = self.service.prepare_chat(request)
        return self._loop.run(self.service.complete(prepared))

    def generate(self, prompt: str, **fields: Any) -> str:
        """The text that continues ``prompt`` (the first choice of :meth:`complete`)."""
        text: str = self.complete(prompt, **fields)["choices"][0]["text"]
        return text

    async def _stop(self) -> None:
        await self.service.backend.stop()


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
    names (``dtype``, ``max_length``, ``max_batch_size``, ``return_probabilities``, ...).
    """
    values = dict(settings)
    if model is not None:
        key = "model_dir" if Path(model).expanduser().is_dir() else "model_id"
        values[key] = os.fspath(model)
    if task is not None:
        values["task"] = task
    values["backend"] = Backend.huggingface
    resolved = ServeSettings(**values)
    source = resolve_model_source(
        model_id=resolved.model_id, model_dir=resolved.model_dir, revision=resolved.model_revision
    )
    if source.needs_conversion and source.builtin is not None:
        from lmserve_backend_hf import convert_builtin

        convert_builtin(source.builtin)
    config = source.config()
    chosen = resolved.task or infer_task(
        config.get("architectures"), is_sentence_transformer=is_sentence_transformer(source.path)
    )
    from lmserve_backend_hf import create_backend

    loop = _LoopThread()
    try:
        loaded = create_backend(LoadRequest(resolved, source, chosen, config, loop.loop))
        if isinstance(loaded, LoadedGenerator):
            service = OpenAIGenerationService(
                backend=loaded.backend,
                tokenizer=loaded.tokenizer,
                facts=loaded.facts,
                limits=GenerationLimits(max_n=resolved.max_n),
                trust_request_chat_template=resolved.trust_request_chat_template,
            )
            loop.run(loaded.backend.start())
            return GeneratorModel(service, resolved.model_name, chosen, loop)
        encoder = EncoderService(
            task=chosen,
            tokenizer=loaded.tokenizer,
            backend=loaded.backend,
            info=loaded.info,
            options=loaded.options,
            max_batch_size=resolved.max_batch_size,
            max_batch_tokens=resolved.max_batch_tokens,
            max_instances=resolved.max_instances_per_request,
        )
        loop.run(encoder.start())
        return EncoderModel(encoder, resolved.model_name, loop)
    except BaseException:
        loop.close()
        raise
