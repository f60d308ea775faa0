"""vLLM backend of lmserve: generation on vLLM's async engine, and pooling models.

``create_backend`` is the ``lmserve.backends`` entry point named ``vllm``;
``check_engine_args`` is the ``lmserve.engine_args`` entry point that validates the
``vllm serve`` engine flags given to ``lmserve serve``. vLLM is imported inside them only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve_core.backend import LoadedModel, LoadRequest

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedModel:
    from lmserve_backend_vllm.loader import load

    return load(request)


def check_engine_args(argv: Sequence[str]) -> list[str]:
    """Parse ``argv`` with vLLM's own engine-argument definitions; returns what vLLM does
    not recognise either (exits 2 on a bad value for a known flag)."""
    from lmserve_backend_vllm.engine_args import check

    return check(argv)


def engine_args_help() -> str:
    from lmserve_backend_vllm.engine_args import help_text

    return help_text()


__all__ = ["check_engine_args", "create_backend", "engine_args_help"]
