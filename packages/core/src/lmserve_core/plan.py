"""Pre-flight: which files, which task, which backend — decided before listening.

Everything here is cheap (JSON files, entry point metadata), so a wrong flag fails at
once with a message that names it, instead of after a port is open.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmserve_core.backend import ENTRY_POINT_GROUP, BackendFactory
from lmserve_core.builtin_models import BuiltinModel
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import (
    ModelSource,
    infer_model_task,
    resolve_model_source,
)
from lmserve_core.settings import Backend, ServeSettings
from lmserve_core.tasks import Task

logger = logging.getLogger(__name__)

CONVERTER_GROUP = "lmserve.converters"


@dataclass(frozen=True)
class ServingPlan:
    source: ModelSource
    config: dict[str, Any]
    task: Task
    backend: str
    backend_reason: str
    # With --backend auto: the backend to fall back to if the chosen one cannot start.
    fallback: str | None = None


def plan_serving(settings: ServeSettings) -> ServingPlan:
    source = resolve_model_source(
        model_id=settings.model_id, model_dir=settings.model_dir, revision=settings.model_revision
    )
    config = source.config()
    inferred: Task | None
    try:
        inferred = infer_model_task(source.path, config)
    except ConfigurationError:
        if settings.task is None:
            raise
        inferred = None
    task = settings.task or inferred
    assert task is not None
    if inferred is not None and task is not inferred:
        logger.warning(
            "--task %s overrides the task inferred from the model (%s)", task.value, inferred.value
        )
    if settings.predictor_host:
        backend, reason, fallback = choose_predictor(settings, task)
    else:
        backend, reason, fallback = choose_backend(settings.backend, task)
    if task.is_generative:
        from lmserve_core.generation.parsers import check_parser_flags

        check_parser_flags(settings)
    check_lora_flags(settings, backend, task)
    check_api_workers(settings, backend, task)
    return ServingPlan(source, config, task, backend, reason, fallback)


# The backends that serve LoRA adapters (lmserve_core.lora.AdapterBackend).
LORA_BACKENDS = ("huggingface", "vllm")


def check_lora_flags(settings: ServeSettings, backend: str, task: Task) -> None:
    """The LoRA flags fit together and the backend serves adapters (before any port opens)."""
    from lmserve_core.lora import parse_lora_modules

    if settings.lora_modules and not settings.enable_lora:
        raise ConfigurationError("--lora-modules needs --enable-lora", param="lora_modules")
    parse_lora_modules(settings.lora_modules or ())
    if settings.max_cpu_loras is not None and settings.max_cpu_loras < settings.max_loras:
        raise ConfigurationError(
            f"--max-cpu-loras {settings.max_cpu_loras} is below --max-loras {settings.max_loras}",
            param="max_cpu_loras",
        )
    if settings.enable_lora and backend not in LORA_BACKENDS:
        raise ConfigurationError(
            f"--enable-lora: the {backend} backend does not serve LoRA adapters (use "
            f"--backend {' or '.join(LORA_BACKENDS)})", param="enable_lora",
        )  # fmt: skip
    if settings.enable_lora and not task.is_generative and backend != "huggingface":
        raise ConfigurationError(
            f"--enable-lora: the {backend} backend serves adapters for text generation; "
            f"{task.value} adapters run on --backend huggingface", param="enable_lora",
        )  # fmt: skip


# The backends whose model can sit behind API workers: encoders run in one process by torch
# or ONNX Runtime (lmserve_server.api_workers forwards padded batches to it).
API_WORKER_BACKENDS = ("huggingface", "onnx")


def check_api_workers(settings: ServeSettings, backend: str, task: Task) -> None:
    """--api_workers N > 1 only where a worker can run everything but the forward pass."""
    if settings.api_workers == 1:
        return
    why = None
    if task.is_generative:
        why = (f"{task.value} is generative (the engine schedules every token in one process); "
               "it serves encoder tasks")  # fmt: skip
    elif settings.predictor_host:
        why = "with --predictor_host the model already runs elsewhere (Triton)"
    elif backend not in API_WORKER_BACKENDS:
        why = f"the {backend} backend is not supported (use --backend huggingface or onnx)"
    elif settings.enable_lora:
        why = "LoRA adapters are loaded per process (drop --enable_lora)"
    if why is not None:
        raise ConfigurationError(
            f"--api_workers {settings.api_workers}: {why}", param="api_workers"
        )


def choose_predictor(settings: ServeSettings, task: Task) -> tuple[str, str, None]:
    """Transformer mode (docs/behaviour.md §6): the model runs on the Triton server at --predictor_host."""
    if task.is_generative:
        raise ConfigurationError(
            f"--predictor_host serves encoder tasks (Triton runs their forward pass); "
            f"{task.value} is generative", param="predictor_host",
        )  # fmt: skip
    if settings.backend in (Backend.vllm, Backend.onnx):
        raise ConfigurationError(
            f"--backend {settings.backend.value} and --predictor_host exclude each other: with a "
            "predictor the model runs on Triton", param="backend",
        )  # fmt: skip
    if not _installed("triton", module="tritonclient"):
        raise ConfigurationError(
            "--predictor_host needs tritonclient and lmserve-backend-hf "
            "(pip install 'tritonclient[http,grpc]' lmserve-backend-hf)", param="predictor_host",
        )  # fmt: skip
    return (
        "triton",
        f"--predictor_host {settings.predictor_host} ({settings.predictor_protocol.value}): "
        "tokenized here, run on Triton",
        None,
    )


def choose_backend(requested: Backend, task: Task) -> tuple[str, str, str | None]:
    """(backend, why, fallback) per docs/behaviour.md §2."""
    if requested is Backend.vllm:
        return "vllm", "--backend vllm was asked for", None
    if requested is Backend.huggingface:
        return "huggingface", "--backend huggingface was asked for", None
    if requested is Backend.onnx:
        if task.is_generative:
            raise ConfigurationError(
                f"--backend onnx serves encoder tasks; {task.value} is generative "
                "(use --backend vllm or huggingface)", param="backend",
            )  # fmt: skip
        return "onnx", "--backend onnx was asked for", None
    if task is Task.text_generation:
        if _installed("vllm"):
            return "vllm", "text_generation: vLLM is the default for generation", "huggingface"
        return "huggingface", "text_generation: vLLM is not installed", None
    if task is Task.text2text_generation:
        return "huggingface", "text2text_generation: vLLM has no encoder-decoder models", None
    return (
        "huggingface",
        f"{task.value} is an encoder task: Hugging Face serves it by default",
        None,
    )


def _installed(backend: str, *, module: str | None = None) -> bool:
    """The backend's entry point and its engine (``module``, default: the backend's name)
    are both importable (without importing)."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return backend in names and importlib.util.find_spec(module or backend) is not None


def load_converter(layout: str) -> Callable[[BuiltinModel], Path]:
    """The backend function that turns a built-in of this layout into a model folder."""
    for ep in importlib.metadata.entry_points(group=CONVERTER_GROUP):
        if ep.name == layout:
            converter: Callable[[BuiltinModel], Path] = ep.load()
            return converter
    raise ConfigurationError(
        f"no installed backend converts {layout} built-in models (pip install lmserve-backend-hf)",
        param="model_id",
    )


def load_backend_factory(name: str) -> BackendFactory:
    """Find a backend through its entry point, so the server never imports one directly."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory: BackendFactory = ep.load()
            return factory
    raise ConfigurationError(
        f"backend {name!r} is not installed (pip install lmserve-backend-{'vllm' if name == 'vllm' else 'hf'})",
        param="backend",
    )
