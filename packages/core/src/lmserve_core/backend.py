"""How the server asks a backend package for a model (entry point group ``lmserve.backends``).

A backend distribution registers ``create_backend(request: LoadRequest) -> LoadedModel``
under the entry point group; the server loads it by name only when that backend is
chosen, so heavy imports happen inside the factory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmserve_core.encoder.base import EncoderOptions, ModelInfo
from lmserve_core.encoder.service import EncoderBackend
from lmserve_core.generation.backend import GenerationTokenizer, GenerativeBackend
from lmserve_core.generation.prepare import ModelFacts
from lmserve_core.model_files import ModelSource
from lmserve_core.observer import ServingObserver
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import TextTokenizer

ENTRY_POINT_GROUP = "lmserve.backends"


@dataclass(frozen=True)
class LoadRequest:
    settings: ServeSettings
    source: ModelSource
    task: Task
    config: dict[str, Any]
    # The server's event loop, for backends whose engine lives on it (vLLM pooling).
    loop: asyncio.AbstractEventLoop | None = None
    # Metrics hooks the backend reports to (decoding steps), if it has any to report.
    observer: ServingObserver | None = None


@dataclass
class LoadedEncoder:
    """An encoder model ready to serve, with what post-processing must know."""

    backend: EncoderBackend
    tokenizer: TextTokenizer
    info: ModelInfo
    options: EncoderOptions
    details: dict[str, Any] = field(default_factory=dict)  # shown in V2 metadata
    # A remote predictor wants few distinct shapes (Triton merges equal ones) and several
    # batches on the wire; an in-process model wants neither.
    bucket_lengths: bool = False
    concurrent_batches: int = 1
    # LoRA adapters the backend holds at once (--max-cpu-loras where it keeps all loaded).
    max_adapters: int | None = None


@dataclass
class LoadedGenerator:
    """A generative model ready to serve through the OpenAI layer."""

    backend: GenerativeBackend
    tokenizer: GenerationTokenizer
    facts: ModelFacts
    details: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters the backend holds at once (None: no limit, e.g. vLLM swaps them in).
    max_adapters: int | None = None


LoadedModel = LoadedEncoder | LoadedGenerator


class BackendFactory(Protocol):
    def __call__(self, request: LoadRequest) -> LoadedModel: ...
