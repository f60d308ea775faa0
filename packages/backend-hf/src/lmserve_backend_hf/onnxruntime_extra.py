"""ONNX Runtime comes from one of two extras that exclude each other (``onnx-cpu`` installs
``onnxruntime``, ``onnx-cuda`` installs ``onnxruntime-gpu``; both provide the same module), so
it may be missing: that is a configuration error naming the extras, not an ImportError."""

from __future__ import annotations

from types import ModuleType

from lmserve_core.errors import ConfigurationError


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigurationError(
            "ONNX Runtime is not installed: install lmserve-backend-hf[onnx-cpu] (or "
            "[onnx-cuda] on a CUDA machine; lmserve-server[hf] or [hf-cuda] bring them)",
            param="backend",
        ) from None
    return onnxruntime
