"""Hugging Face transformers backend of lmserve.

``create_backend`` is the ``lmserve.backends`` entry point; torch and transformers are
imported inside it, so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve_core.backend import LoadedEncoder, LoadRequest

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedEncoder:
    from lmserve_backend_hf.loader import load_encoder

    return load_encoder(request)


__all__ = ["create_backend"]
