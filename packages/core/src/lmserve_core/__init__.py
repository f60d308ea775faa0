"""lmserve core: tasks, backend interfaces, codecs, batching and the error tree.

Free of torch, transformers, vLLM and web frameworks: ``import lmserve_core`` is cheap.
"""

from lmserve_core.errors import (
    BackendError,
    ConfigurationError,
    InputTooLong,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)
from lmserve_core.settings import Backend, ServeSettings
from lmserve_core.tasks import Task, infer_task, parse_task

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "ConfigurationError",
    "InputTooLong",
    "InvalidInput",
    "LmserveError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "ServeSettings",
    "Task",
    "infer_task",
    "parse_task",
]
