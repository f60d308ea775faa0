"""JSON logs with transformers already imported (an embedding application): the bars that
HF_HUB_DISABLE_PROGRESS_BARS would have switched off at import are switched off directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmserve_server import runner


@pytest.fixture
def bars_on() -> Iterator[None]:
    hf_logging = pytest.importorskip("transformers.utils.logging")
    hub_utils = pytest.importorskip("huggingface_hub.utils")
    hf_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()
    yield
    hf_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()


def test_loaded_libraries_bars_are_switched_off(bars_on: None) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils.logging import is_progress_bar_enabled

    assert is_progress_bar_enabled() and not are_progress_bars_disabled()
    runner._disable_loaded_progress_bars()
    assert not is_progress_bar_enabled() and are_progress_bars_disabled()
