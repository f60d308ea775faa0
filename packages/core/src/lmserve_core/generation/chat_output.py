"""A chat choice's text as the client gets it: content, reasoning and tool calls.

vLLM 0.32's chat server is the reference: a named ``tool_choice`` finishes with "stop", an
``auto`` choice that called a tool and a ``required`` one that stopped finish with
"tool_calls"; ``parallel_tool_calls: false`` keeps the first call only; tool call ids are
``chatcmpl-tool-<hex>``; with ``include_reasoning: false`` the reasoning (and the logprobs, which
would spell it out) are left out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from lmserve_core.generation.output_parsing import ChoiceParser, ParsedDelta, RequestParsing
from lmserve_core.generation.prepare import Prepared
from lmserve_protocols.openai import (
    ChatResponseMessage,
    FinishReason,
    FunctionCall,
    ToolCall,
)


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _tool_finish(prep: Prepared, called: bool, finish: FinishReason) -> FinishReason:
    if prep.tool_mode == "auto" and called:
        return "tool_calls"
    if prep.tool_mode == "required" and finish == "stop":
        return "tool_calls"
    return finish


def parsed_message(
    prep: Prepared,
    parsing: RequestParsing,
    text: str,
    token_ids: Sequence[int],
    finish: FinishReason,
) -> tuple[ChatResponseMessage, FinishReason]:
    """The whole choice's message and its finish reason (non-streaming)."""
    parsed = parsing.new_choice().parse(text, token_ids)
    calls = [
        ToolCall(id=call.id or tool_call_id(),
                 function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in parsed.tool_calls
    ]  # fmt: skip
    if not prep.parallel_tool_calls:
        calls = calls[:1]
    content = parsed.content
    if prep.tool_mode in ("named", "required"):
        content = content or ""
    message = ChatResponseMessage(
        role=prep.role,
        content=content,
        reasoning=parsed.reasoning if prep.include_reasoning else None,
        tool_calls=calls,
    )
    return message, _tool_finish(prep, bool(calls), finish)


class StreamedChoice:
    """One choice of a stream through its parser: each piece of text becomes a delta (or
    nothing yet), tool calls get their ids in their first piece."""

    def __init__(self, prep: Prepared, parser: ChoiceParser) -> None:
        self.prep = prep
        self.parser = parser
        self.tools_streamed = False
        self._ids: dict[int, str] = {}

    def delta(
        self, text: str, token_ids: Sequence[int], *, finished: bool
    ) -> dict[str, Any] | None:
        """A :class:`ChatDelta`'s fields, or None when there is nothing to send yet."""
        parsed = self.parser.parse_delta(text, token_ids, finished=finished)
        if parsed is None or parsed.empty:
            return None
        return self._fields(parsed)

    def _fields(self, parsed: ParsedDelta) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if parsed.content:
            out["content"] = parsed.content
        if parsed.reasoning and self.prep.include_reasoning:
            out["reasoning"] = parsed.reasoning
        calls = []
        for call in parsed.tool_calls:
            if not self.prep.parallel_tool_calls and call.index != 0:
                continue
            piece: dict[str, Any] = {"index": call.index}
            function: dict[str, str] = {}
            if call.index not in self._ids:
                self._ids[call.index] = call.id or tool_call_id()
                piece["id"], piece["type"] = self._ids[call.index], "function"
            if call.name is not None:
                function["name"] = call.name
            if call.arguments is not None:
                function["arguments"] = call.arguments
            if function:
                piece["function"] = function
            calls.append(piece)
        if calls:
            self.tools_streamed = True
            out["tool_calls"] = calls
        return out or None

    def finish_reason(self, finish: FinishReason) -> FinishReason:
        # Streams: "tool_calls" once a call went out and the model stopped (not for a named
        # function), as vLLM's streaming path decides.
        if self.tools_streamed and self.prep.tool_mode != "named" and finish == "stop":
            return "tool_calls"
        return finish
