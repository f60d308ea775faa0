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
    # An API worker (--api_workers): the model runs in another process, reached through this
    # backend. The factory loads only what the front end needs (tokenizer, model facts, no
    # weights) and serves through it.
    remote: EncoderBackend | None = None


# Instances per encoder batch when neither --max_batch_size nor the backend says.
DEFAULT_BATCH_SIZE = 32
# Models run in this process (torch, ONNX Runtime) gather this many instances per batch and
# forward them as length-sorted chunks of IN_PROCESS_CHUNK_ROWS: on CPU a cross-encoder's
# pairs/s peaked at forward passes of 16 rows (benchmarks/results/rerank.json).
IN_PROCESS_BATCH_SIZE = 64
IN_PROCESS_CHUNK_ROWS = 16


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
    # An in-process model that computes every padded position: forward a batch in
    # length-sorted chunks of at most this many rows when that cuts the padding by 10% or more
    # (encoder.service.CHUNK_MIN_SAVING), so short rows do not pay for the longest. None:
    # one pass per batch (vLLM packs without padding; Triton merges equal shapes).
    chunk_rows: int | None = None
    # Instances one batch takes from the queue unless --max_batch_size says: chunked models
    # gather more than a chunk, so sorting has rows of like lengths to group (a reranker at
    # 16 documents per request served 0.82 of CrossEncoder.predict gathering 32, 1.07
    # gathering 64).
    default_batch_size: int = DEFAULT_BATCH_SIZE
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
