"""Shared fixtures of the micro-benchmarks (pytest-benchmark).

Not part of the default test run: the root pyproject's ``testpaths`` are ``packages`` and
``tests``. Run them with::

    uv run --no-sync pytest benchmarks/micro --benchmark-only -p no:randomly
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# `from prompts import PROMPTS` (benchmarks/prompts.py) in the benchmark modules.
_BENCHMARKS = str(Path(__file__).resolve().parents[1])
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)

from prompts import PROMPTS  # noqa: E402


@pytest.fixture(scope="session")
def model_path() -> Path:
    from lmserve_core.builtin_models import locate_builtin

    return locate_builtin("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def prompt_batch() -> Callable[[int], list[str]]:
    """The first ``n`` of PROMPTS, cycling when ``n`` is larger (batch 1 is "Hi!")."""

    def make(n: int) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    return make


@pytest.fixture(scope="session")
def rust_tokenizer(model_path: Path) -> Any:
    from lmserve_backend_hf.rust_tokenizer import load_rust_tokenizer

    return load_rust_tokenizer(model_path, disable_lower_case=False)


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path) -> Any:
    from lmserve_backend_hf.tokenizer import load_tokenizer

    return load_tokenizer(
        str(model_path), revision=None, trust_remote_code=False, disable_lower_case=False
    )


@pytest.fixture
def record_rate() -> Callable[..., None]:
    """Store ``sequences``, ``sequences_per_s`` (from the mean) and ``sequences_per_s_best``
    (from the fastest round) in the benchmark's extra_info."""

    def record(benchmark: Any, sequences: int, **extra: Any) -> None:
        benchmark.extra_info["sequences"] = sequences
        benchmark.extra_info.update(extra)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["sequences_per_s"] = round(sequences / stats.stats.mean, 1)
            # From the fastest round: steadier than the mean on a shared machine.
            benchmark.extra_info["sequences_per_s_best"] = round(sequences / stats.stats.min, 1)

    return record
