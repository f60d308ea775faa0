"""vLLM backend of lmserve (skeleton: generation and pooling on vLLM arrive with issue 4).

``create_backend`` is the ``lmserve.backends`` entry point named ``vllm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve_core.errors import ConfigurationError

if TYPE_CHECKING:
    from lmserve_core.backend import LoadedEncoder, LoadRequest

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedEncoder:
    raise ConfigurationError(
        "the vLLM backend is not available in this version of lmserve; "
        "use --backend huggingface (or auto)",
        param="backend",
    )


__all__ = ["create_backend"]
