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
    _passive_openmp_waits()
    from lmserve_backend_hf.loader import load_encoder

    return load_encoder(request)


def _passive_openmp_waits() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless the user's environment says
    otherwise). Read once, when torch loads libgomp, so it must be set before torch is imported.

    Between two encoder forward passes the event loop parses HTTP, tokenizes and encodes
    responses on the same cores; spinning torch threads stole them: on 2 cores, tiny BERT at
    concurrency 1 cost 6.1 ms of server CPU per request with spinning and 2.9 ms without
    (BENCHMARKS.md).
    """
    if "torch" in sys.modules:
        return  # too late to matter; libgomp has read its environment
    value = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger(__name__).info("OpenMP wait policy %s (OMP_WAIT_POLICY)", value)


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
