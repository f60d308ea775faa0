"""Hugging Face transformers backend of lmserve.

``create_backend`` is the ``lmserve.backends`` entry point; torch and transformers are
imported inside it, so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lmserve_core.backend import LoadedModel, LoadRequest
    from lmserve_core.builtin_models import BuiltinModel

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedModel:
    if request.task.is_generative:
        from lmserve_backend_hf.gen_loader import load_generator

        return load_generator(request)
    from lmserve_backend_hf.loader import load_encoder

    return load_encoder(request)


def create_triton_backend(request: LoadRequest) -> LoadedModel:
    """``lmserve.backends`` entry point ``triton``: transformer mode (no torch import)."""
    from lmserve_backend_hf.triton import load_triton_encoder

    return load_triton_encoder(request)


def create_onnx_backend(request: LoadRequest) -> LoadedModel:
    """``lmserve.backends`` entry point ``onnx``: encoders on ONNX Runtime, in-process."""
    from lmserve_backend_hf.onnx_backend import load_onnx_encoder

    return load_onnx_encoder(request)


def convert_builtin(model: BuiltinModel) -> Path:
    """``lmserve.converters`` entry point: GGUF built-ins to a safetensors folder."""
    from lmserve_backend_hf.gguf import convert_gguf

    return convert_gguf(model)


__all__ = ["convert_builtin", "create_backend", "create_onnx_backend", "create_triton_backend"]
