"""lmserve core: tasks, backend interfaces, codecs, batching and the error tree.

Free of torch, transformers, vLLM and web frameworks: ``import lmserve_core`` is cheap (numpy
loads with the encoder pipeline, on first use of its names).

- :class:`Task`, :func:`parse_task`, :func:`infer_task`: what a model does.
- :class:`EncoderService`: one encoder model's pipeline (tokenize, validate, batch, forward,
  post-process into KServe V1 / V2 outputs) around any :class:`EncoderBackend` (numpy in, numpy
  out) and :class:`TextTokenizer`; :class:`ModelInfo` and :class:`EncoderOptions` configure it.
- :class:`DynamicBatcher`: merges requests that arrive while the model is busy.
- :class:`GenerativeBackend` and :class:`OpenAIGenerationService`: the OpenAI layer (chat
  templates, stop strings, n, logprobs, usage, streaming) above any streaming generator.
- :class:`ServeSettings`: every setting of ``lmserve serve``.
- Errors, free of HTTP codes::

    LmserveError
    ├── InvalidInput
    │   └── InputTooLong
    ├── ModelNotFound
    ├── ModelNotReady
    ├── Overloaded
    ├── BackendError
    │   └── PredictorError
    └── ConfigurationError
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve_core.batching import DynamicBatcher
from lmserve_core.errors import (
    BackendError,
    ConfigurationError,
    InputTooLong,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PredictorError,
)
from lmserve_core.generation.backend import GenerativeBackend
from lmserve_core.lazy import lazy_getattr
from lmserve_core.settings import Backend, ServeSettings
from lmserve_core.tasks import Task, infer_task, parse_task
from lmserve_core.tokenizer import Encoding, TextTokenizer

if TYPE_CHECKING:
    from lmserve_core.encoder import EncoderBackend, EncoderOptions, EncoderService, ModelInfo
    from lmserve_core.generation.service import OpenAIGenerationService

__version__ = "0.1.0"

# Names whose modules import numpy: loaded on first use (PEP 562).
_LAZY = {
    "EncoderBackend": "lmserve_core.encoder",
    "EncoderOptions": "lmserve_core.encoder",
    "EncoderService": "lmserve_core.encoder",
    "ModelInfo": "lmserve_core.encoder",
    "OpenAIGenerationService": "lmserve_core.generation.service",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "Backend",
    "BackendError",
    "ConfigurationError",
    "DynamicBatcher",
    "EncoderBackend",
    "EncoderOptions",
    "EncoderService",
    "Encoding",
    "GenerativeBackend",
    "InputTooLong",
    "InvalidInput",
    "LmserveError",
    "ModelInfo",
    "ModelNotFound",
    "ModelNotReady",
    "OpenAIGenerationService",
    "Overloaded",
    "PredictorError",
    "ServeSettings",
    "Task",
    "TextTokenizer",
    "infer_task",
    "parse_task",
]
