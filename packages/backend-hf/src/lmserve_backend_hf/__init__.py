"""Hugging Face transformers backend of lmserve, usable as a library.

From plain Python, no server::

    from lmserve_backend_hf import load_model, export_onnx

    with load_model("path/to/model") as model:      # task inferred from config.json
        model.predict(["I love this"])               # encoders: V1 predictions
        # generative models: model.generate(...), model.complete(...), model.chat(...)

    export_onnx(model_dir, "sequence_classification", ["input_ids", "attention_mask"], out)

For ``lmserve serve`` it plugs in through entry points: ``create_backend`` (``huggingface``),
``create_triton_backend`` (``triton``), ``create_onnx_backend`` (``onnx``), ``convert_builtin``
(``lmserve.converters``) and ``export_onnx`` (``lmserve.exporters``). torch and transformers are
imported when a model is loaded, never by ``import lmserve_backend_hf``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from lmserve_core.lazy import lazy_getattr

if TYPE_CHECKING:
    from pathlib import Path

    from lmserve_backend_hf.export import export_onnx
    from lmserve_backend_hf.library import EncoderModel, GeneratorModel, load_model
    from lmserve_core.backend import LoadedModel, LoadRequest
    from lmserve_core.builtin_models import BuiltinModel

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedModel:
    """``lmserve.backends`` entry point ``huggingface``: an encoder or a generator on
    transformers/torch, as ``request.task`` says."""
    if request.task.is_generative:
        from lmserve_backend_hf.gen_loader import load_generator

        return load_generator(request)
    if request.remote is not None:  # an API worker: the weights live in another process
        from lmserve_backend_hf.encoder_info import encoder_parts, front_end

        return front_end(request, encoder_parts(request))
    set_encoder_openmp_waits()
    from lmserve_backend_hf.loader import load_encoder

    return load_encoder(request)


# libgomp's spin count before an idle OpenMP thread sleeps: about 0.1 ms by libgomp's own
# estimate (100,000 spins per ms; 0.2-0.7 ms measured on this project's 2-core EPYC VM).
OPENMP_SPIN_COUNT = "10000"


def set_encoder_openmp_waits() -> dict[str, str]:
    """Idle OpenMP threads spin briefly, then sleep; returns the settings in effect. A user's
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept as it is. libgomp reads them once, when
    torch loads it, so this must run before torch is imported (later it changes nothing).

    Sleeping, not spinning (libgomp spins about 3 ms by default): between two encoder forward
    passes the event loop parses HTTP, tokenizes and encodes responses on the same cores, and
    spinning threads stole them (tiny BERT at concurrency 1: 6.1 ms of server CPU per request
    spinning, 2.9 ms sleeping; BENCHMARKS.md). But ``PASSIVE`` alone means no spin at all, so
    every op of a forward pass woke the other threads from a futex sleep: a 64-wide linear
    layer took 80 µs on two such threads against 8 µs on one (this project's 2-core VM). A
    0.1 ms spin keeps them awake between the ops of one pass and lets them sleep between passes:
    the tiny BERT's forward at 2 threads went 4.3-4.6 → 0.9-1.3 ms at batch 1 and 6.8-6.9 →
    1.8-2.1 ms at batch 32 (BENCHMARKS.md).
    """
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    if "torch" not in sys.modules and not any(name in os.environ for name in names):
        os.environ.update({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": OPENMP_SPIN_COUNT})
    settings = {name: os.environ[name] for name in names if name in os.environ}
    logging.getLogger(__name__).info("OpenMP waits: %s", settings or "libgomp's defaults")
    return settings


def create_triton_backend(request: LoadRequest) -> LoadedModel:
    """``lmserve.backends`` entry point ``triton``: transformer mode (no torch import)."""
    from lmserve_backend_hf.triton import load_triton_encoder

    return load_triton_encoder(request)


def create_onnx_backend(request: LoadRequest) -> LoadedModel:
    """``lmserve.backends`` entry point ``onnx``: encoders on ONNX Runtime, in-process."""
    if request.remote is not None:  # an API worker: the session lives in another process
        from lmserve_backend_hf.encoder_info import front_end
        from lmserve_backend_hf.onnx_backend import onnx_parts

        return front_end(request, onnx_parts(request))
    from lmserve_backend_hf.onnx_backend import load_onnx_encoder

    return load_onnx_encoder(request)


def convert_builtin(model: BuiltinModel) -> Path:
    """``lmserve.converters`` entry point: GGUF built-ins to a safetensors folder."""
    from lmserve_backend_hf.gguf import convert_gguf

    return convert_gguf(model)


# The library API loads on first use: it imports numpy and the OpenAI schemas, which a
# server that only asks for an entry point does not need yet.
_LAZY = {
    "load_model": "lmserve_backend_hf.library",
    "EncoderModel": "lmserve_backend_hf.library",
    "GeneratorModel": "lmserve_backend_hf.library",
    "export_onnx": "lmserve_backend_hf.export",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "EncoderModel",
    "GeneratorModel",
    "convert_builtin",
    "create_backend",
    "create_onnx_backend",
    "create_triton_backend",
    "export_onnx",
    "load_model",
]
