"""Which output parsing a server runs: vLLM's parsers where vLLM is installed, lmserve's own
tool-call formats where it is not.

``--tool-call-parser``, ``--reasoning-parser`` and their ``--*-parser-plugin`` flags name vLLM's
parsers. The implementation that knows them is found through the ``lmserve.output_parsers``
entry point (``lmserve_backend_vllm.output_parsers``), so core never imports vLLM; it is used on
both backends. Without it, ``lmserve_core.generation.tool_formats`` parses the hermes,
llama3_json, mistral and pythonic formats, and no reasoning parser exists.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Protocol

from lmserve_core.errors import ConfigurationError
from lmserve_core.generation.backend import GenerationTokenizer
from lmserve_core.generation.output_parsing import OutputParsing
from lmserve_core.settings import ServeSettings

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmserve.output_parsers"


class ParserProvider(Protocol):
    """What the ``lmserve.output_parsers`` entry point loads (a module is fine)."""

    def check(self, settings: ServeSettings) -> None:
        """Raise ConfigurationError naming the flag when a parser name or plugin is wrong."""
        ...

    def create(self, settings: ServeSettings, tokenizer: GenerationTokenizer) -> OutputParsing:
        """The server's output parsing (the tokenizer is the served model's)."""
        ...


def _provider() -> ParserProvider | None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            provider: Any = ep.load()
        except ImportError as exc:  # lmserve-backend-vllm without a working vLLM
            logger.debug("output parsers %s unavailable: %s", ep.name, exc)
            continue
        return provider  # type: ignore[no-any-return]
    return None


def _wants_parsers(settings: ServeSettings) -> bool:
    return bool(
        settings.tool_call_parser
        or settings.reasoning_parser
        or settings.tool_parser_plugin
        or settings.reasoning_parser_plugin
    )


def _check_without_vllm(settings: ServeSettings) -> None:
    from lmserve_core.generation.tool_formats import FORMATS

    for flag in ("reasoning_parser", "reasoning_parser_plugin", "tool_parser_plugin"):
        if getattr(settings, flag):
            raise ConfigurationError(
                f"--{flag} needs vLLM's parsers (pip install lmserve-backend-vllm)", param=flag
            )
    name = settings.tool_call_parser
    if name and name not in FORMATS:
        raise ConfigurationError(
            f"--tool_call_parser {name!r}: without vLLM installed lmserve parses "
            f"{', '.join(sorted(FORMATS))}",
            param="tool_call_parser",
        )


def check_parser_flags(settings: ServeSettings) -> None:
    """Startup check of the parser flags (ConfigurationError names the flag: exit 2)."""
    if settings.enable_auto_tool_choice and not settings.tool_call_parser:
        raise ConfigurationError(
            "--enable_auto_tool_choice requires --tool_call_parser", param="tool_call_parser"
        )
    if not _wants_parsers(settings):
        return
    provider = _provider()
    if provider is None:
        _check_without_vllm(settings)
    else:
        provider.check(settings)


def output_parsing(settings: ServeSettings, tokenizer: GenerationTokenizer) -> OutputParsing:
    """The server's output parsing. Without parser flags, lmserve's own: content passes through,
    and tool_choice "required" or a named function (which need no parser) still work."""
    from lmserve_core.generation.tool_formats import FormatOutputParsing

    if _wants_parsers(settings):
        provider = _provider()
        if provider is not None:
            return provider.create(settings, tokenizer)
    return FormatOutputParsing(settings.tool_call_parser, settings.enable_auto_tool_choice)
