"""The seam between generated chat text and what the client gets: reasoning, content, tool calls.

A server has one ``OutputParsing`` (from ``--tool-call-parser``, ``--reasoning-parser`` and
``--enable-auto-tool-choice``). For each chat request it makes a ``RequestParsing``: what the
request needs from the engine (a structured-output constraint for ``tool_choice`` "required"
or a named function, special tokens kept so the parser can see tool-call markers) and a
``ChoiceParser`` per choice, stateful across a stream's deltas.

Two implementations: vLLM's own parsers where vLLM is installed
(``lmserve_backend_vllm.output_parsers``, every tool and reasoning parser vLLM ships, on both
backends), and ``lmserve_core.generation.tool_formats`` without it (hermes, llama3_json,
mistral, pythonic; no reasoning parsers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lmserve_core.errors import InvalidInput
from lmserve_core.generation.params import ReasoningGate, StructuredOutput
from lmserve_protocols.openai import ChatCompletionRequest, NamedToolChoice

ToolMode = Literal["none", "auto", "required", "named"]


def tool_mode(request: ChatCompletionRequest) -> ToolMode:
    """The request's ``tool_choice`` after vLLM's checks and defaults ("auto" when tools come
    without one); InvalidInput names ``tools`` or ``tool_choice``."""
    if request.tools is not None and not request.tools:
        raise InvalidInput(
            "`tools` must not be an empty array. Either provide at least one tool or omit "
            "the field entirely.", param="tools",
        )  # fmt: skip
    choice = request.tool_choice
    if choice is None:
        return "auto" if request.tools else "none"
    if choice == "none":
        return "none"
    if not request.tools:
        raise InvalidInput("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if all(tool.function.name != name for tool in request.tools):
            raise InvalidInput(
                f"The tool specified in `tool_choice` ({name!r}) does not match any of the "
                "specified `tools`", param="tool_choice",
            )  # fmt: skip
        return "named"
    return choice


@dataclass(frozen=True)
class ParsedToolCall:
    """One complete tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str | None = None  # None: the service makes one ("chatcmpl-tool-<hex>")


@dataclass(frozen=True)
class ParsedOutput:
    """A whole choice's text, split. ``tool_calls`` empty: the model called no tool."""

    content: str | None
    reasoning: str | None = None
    tool_calls: tuple[ParsedToolCall, ...] = ()


@dataclass
class ToolCallDelta:
    """A piece of one tool call in a stream, as OpenAI sends them: ``id`` and ``name`` in the
    call's first piece, then fragments of ``arguments`` (concatenated they are the JSON)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class ParsedDelta:
    """What one streamed piece of text adds to a choice (all None/empty: nothing to send yet)."""

    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.content and not self.reasoning and not self.tool_calls


class ChoiceParser(Protocol):
    """Splits one choice's output. Non-streaming callers use ``parse`` once; streams call
    ``parse_delta`` for every piece of text, the last with ``finished=True``."""

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput: ...

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None: ...


@dataclass(frozen=True)
class RequestAdjustments:
    """What a chat request needs from generation so that its output can be parsed."""

    # Replaces the request's own constraint (tool_choice "required"/named forces the tools'
    # schema, as vLLM does). None: keep the request's (response_format/structured_outputs).
    structured: StructuredOutput | None = None
    # False where the parser must see special tokens (tool-call markers); None: the request's.
    skip_special_tokens: bool | None = None


class RequestParsing(Protocol):
    @property
    def adjustments(self) -> RequestAdjustments: ...

    @property
    def active(self) -> bool:
        """False: content passes through untouched (no tools in play, no reasoning parser)."""
        ...

    def new_choice(self) -> ChoiceParser: ...

    def reasoning_gate(self) -> ReasoningGate | None:
        """A fresh gate for one sequence (None: no reasoning parser, constrain from the start)."""
        ...


class OutputParsing(Protocol):
    """Server-wide: makes a ``RequestParsing`` per chat request (raises InvalidInput)."""

    def for_request(
        self, request: ChatCompletionRequest, prompt_ids: Sequence[int]
    ) -> RequestParsing: ...

    def reasoning_gate(self) -> ReasoningGate | None:
        """A gate for one sequence of a plain completion (None: no reasoning parser). vLLM's
        engine holds a completion's constraint back until the reasoning ends too."""
        ...
