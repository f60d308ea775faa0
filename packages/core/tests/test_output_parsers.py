"""Which output parsing a server runs, with and without vLLM's parsers installed."""

from __future__ import annotations

import pytest

from lmserve_core.errors import ConfigurationError
from lmserve_core.generation import parsers
from lmserve_core.generation.tool_formats import FormatOutputParsing
from lmserve_core.settings import ServeSettings


class _NoTokenizer:
    pass


@pytest.fixture
def without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsers, "_provider", lambda: None)


def test_no_parser_flags_is_lmserve_own_parsing() -> None:
    parsing = parsers.output_parsing(ServeSettings(), _NoTokenizer())  # type: ignore[arg-type]
    assert isinstance(parsing, FormatOutputParsing) and parsing.format is None


@pytest.mark.usefixtures("without_vllm")
def test_without_vllm_the_four_formats_parse_and_reasoning_is_refused() -> None:
    settings = ServeSettings(tool_call_parser="pythonic", enable_auto_tool_choice=True)
    parsers.check_parser_flags(settings)
    parsing = parsers.output_parsing(settings, _NoTokenizer())  # type: ignore[arg-type]
    assert isinstance(parsing, FormatOutputParsing)
    assert parsing.format is not None and parsing.format.name == "pythonic"
    with pytest.raises(ConfigurationError) as err:
        parsers.check_parser_flags(ServeSettings(tool_call_parser="qwen3_xml"))
    assert err.value.param == "tool_call_parser" and "hermes" in err.value.message
    with pytest.raises(ConfigurationError) as err:
        parsers.check_parser_flags(ServeSettings(reasoning_parser="deepseek_r1"))
    assert err.value.param == "reasoning_parser"


def test_auto_tool_choice_needs_a_parser() -> None:
    with pytest.raises(ConfigurationError) as err:
        parsers.check_parser_flags(ServeSettings(enable_auto_tool_choice=True))
    assert err.value.param == "tool_call_parser"
