"""The vLLM backend is a skeleton: its entry point exists and refuses clearly."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from lmserve_core.backend import ENTRY_POINT_GROUP, LoadRequest
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import ModelSource
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task


def test_entry_point_is_registered_and_refuses_with_the_flag_named() -> None:
    (ep,) = [
        ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "vllm"
    ]
    factory = ep.load()
    request = LoadRequest(ServeSettings(), ModelSource(Path("."), "x"), Task.text_generation, {})
    with pytest.raises(ConfigurationError) as exc:
        factory(request)
    assert exc.value.param == "backend" and "--backend huggingface" in exc.value.message
