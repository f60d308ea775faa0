"""vLLM's own tool-call and reasoning parsers behind lmserve's output-parsing seam.

Every parser vLLM ships (and any a ``--*-parser-plugin`` registers) runs here unchanged, through
vLLM's ``ParserManager``: the same composed ``Parser`` its OpenAI server builds, given the same
request object (a vLLM ``ChatCompletionRequest`` made from the client's body). So the request
adjustments (the tools' JSON schema or structural tag for ``tool_choice`` "required" or a named
function, special tokens kept for the parser) and the parsing itself are vLLM's, on either
backend: the Hugging Face engine gets the constraint as a ``StructuredOutput`` like any other.

Loaded through the ``lmserve.output_parsers`` entry point (``lmserve_core.generation.parsers``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmserve_core.errors import ConfigurationError, InvalidInput
from lmserve_core.generation.backend import GenerationTokenizer
from lmserve_core.generation.output_parsing import (
    ParsedDelta,
    ParsedOutput,
    ParsedToolCall,
    RequestAdjustments,
    ToolCallDelta,
)
from lmserve_core.generation.params import StructuredOutput
from lmserve_core.generation.prepare import template_kwargs
from lmserve_core.generation.structured import structured_output
from lmserve_core.settings import ServeSettings
from lmserve_protocols.openai import ChatCompletionRequest, StructuredOutputsParams


def _import_plugins(settings: ServeSettings) -> None:
    """Import the ``--*-parser-plugin`` files as vLLM does (their parsers register themselves);
    one that does not import is a startup error here, where vLLM logs it and goes on."""
    from vllm.utils.import_utils import import_plugin

    for flag in ("tool_parser_plugin", "reasoning_parser_plugin"):
        path = getattr(settings, flag)
        if not path:
            continue
        if path.endswith(".py") and not os.path.isfile(path):
            raise ConfigurationError(f"--{flag}: no such file: {path}", param=flag)
        try:
            module = import_plugin(path)
        except Exception as exc:
            module, reason = None, str(exc)
        else:
            reason = "see the log above"
        if module is None:
            raise ConfigurationError(f"--{flag}: cannot import it ({reason})", param=flag)


def check(settings: ServeSettings) -> None:
    """The parser names exist (after importing the plugins), as ``vllm serve`` checks them."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    _import_plugins(settings)
    for flag, name, known in (
        ("tool_call_parser", settings.tool_call_parser, ToolParserManager.list_registered()),
        ("reasoning_parser", settings.reasoning_parser, ReasoningParserManager.list_registered()),
    ):
        if name and name not in known:
            raise ConfigurationError(
                f"--{flag} {name!r} is not one of vLLM's: {', '.join(sorted(known))}", param=flag
            )


def create(settings: ServeSettings, tokenizer: GenerationTokenizer) -> VLLMOutputParsing:
    from vllm.parser import ParserManager

    _import_plugins(settings)
    raw = getattr(tokenizer, "raw", None)
    if raw is None:
        raise ConfigurationError(
            "vLLM's parsers need a Hugging Face tokenizer; this backend has none",
            param="tool_call_parser",
        )
    try:
        parser_cls = ParserManager.get_parser(
            tool_parser_name=settings.tool_call_parser,
            reasoning_parser_name=settings.reasoning_parser,
            enable_auto_tools=settings.enable_auto_tool_choice,
            tool_strict_level=settings.tool_strict_level.value,
            tokenizer=raw,
        )
    except Exception as exc:  # a parser that cannot work with this tokenizer
        raise ConfigurationError(f"vLLM's parsers refuse this model: {exc}") from exc
    return VLLMOutputParsing(parser_cls, raw, settings.enable_auto_tool_choice)


def _structured(params: Any) -> StructuredOutput | None:
    """vLLM's ``StructuredOutputsParams`` (a parser's adjustment) as lmserve's constraint, read
    the way a request's ``structured_outputs`` is (``lmserve_core.generation.structured``)."""
    if params is None:
        return None
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    spec, _ = structured_output(None, StructuredOutputsParams.model_validate(fields))
    return spec


class VLLMOutputParsing:
    """``OutputParsing`` over vLLM's composed ``Parser`` class (None: no parser flags)."""

    def __init__(self, parser_cls: Any, tokenizer: Any, enable_auto_tools: bool) -> None:
        self.parser_cls = parser_cls
        self.tokenizer = tokenizer
        self.enable_auto_tools = enable_auto_tools

    def for_request(
        self, request: ChatCompletionRequest, prompt_ids: Sequence[int]
    ) -> VLLMRequestParsing:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VLLMChatRequest,
        )

        body = request.model_dump(mode="json", by_alias=True, exclude_unset=True)
        try:
            vllm_request = VLLMChatRequest.model_validate(body)
        except Exception as exc:  # vLLM's own validation of the same body
            raise InvalidInput(f"invalid chat request for vLLM's parsers: {exc}") from None
        kwargs = template_kwargs(request)
        before_structured = vllm_request.extract_structured_outputs()
        before_skip = vllm_request.skip_special_tokens
        if self.parser_cls is not None:
            probe = self._parser(vllm_request, kwargs)
            vllm_request = probe.adjust_request(vllm_request)
        after = vllm_request.extract_structured_outputs()
        adjustments = RequestAdjustments(
            structured=_structured(after) if after != before_structured else None,
            skip_special_tokens=(
                vllm_request.skip_special_tokens
                if vllm_request.skip_special_tokens != before_skip
                else None
            ),
        )
        return VLLMRequestParsing(self, vllm_request, kwargs, list(prompt_ids), adjustments)

    def reasoning_gate(self) -> VLLMReasoningGate | None:
        if self.parser_cls is None:
            return None
        reasoning = self.parser_cls(self.tokenizer, None).reasoning_parser
        # A completion: vLLM's engine asks its parser about the prompt (reasoning_ended None).
        return None if reasoning is None else VLLMReasoningGate(reasoning, None, {})

    def _parser(self, vllm_request: Any, kwargs: dict[str, Any]) -> Any:
        return self.parser_cls(self.tokenizer, vllm_request.tools, chat_template_kwargs=kwargs)


@dataclass
class VLLMRequestParsing:
    owner: VLLMOutputParsing
    request: Any  # vLLM's ChatCompletionRequest, adjusted
    template_kwargs: dict[str, Any]
    prompt_ids: list[int]
    adjustments: RequestAdjustments

    @property
    def active(self) -> bool:
        return self.owner.parser_cls is not None

    def new_choice(self) -> VLLMChoiceParser:
        parser = self.owner._parser(self.request, self.template_kwargs)
        return VLLMChoiceParser(self, parser)

    def reasoning_gate(self) -> VLLMReasoningGate | None:
        if self.owner.parser_cls is None:
            return None
        parser = self.owner._parser(self.request, self.template_kwargs)
        if parser.reasoning_parser is None:
            return None
        ended = self.request.resolve_reasoning_ended(parser, self.prompt_ids)
        engine_kwargs = {"chat_template_kwargs": self.template_kwargs}
        return VLLMReasoningGate(parser.reasoning_parser, ended, engine_kwargs)


@dataclass
class VLLMReasoningGate:
    """vLLM's reasoning parser deciding where a sequence's reasoning ends (as vLLM's
    structured-output manager asks it)."""

    parser: Any  # vLLM's ReasoningParser, one per sequence
    ended_in_prompt: bool | None
    parser_kwargs: dict[str, Any]

    def ends_in(self, token_ids: Sequence[int]) -> bool:
        return bool(self.parser.is_reasoning_end(list(token_ids)))

    def ends_with(self, token_ids: Sequence[int], delta_ids: Sequence[int]) -> bool:
        return bool(self.parser.is_reasoning_end_streaming(list(token_ids), list(delta_ids)))


class VLLMChoiceParser:
    """One vLLM ``Parser`` per choice: its stream state is per choice, as in vLLM's server."""

    def __init__(self, owner: VLLMRequestParsing, parser: Any) -> None:
        self.owner = owner
        self.parser = parser

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput:
        self.parser.set_prompt_token_ids(self.owner.prompt_ids)
        reasoning, content, calls = self.parser.parse(
            text, self.owner.request, enable_auto_tools=self.owner.owner.enable_auto_tools,
            model_output_token_ids=list(token_ids),
        )  # fmt: skip
        return ParsedOutput(
            content=content,
            reasoning=reasoning,
            tool_calls=tuple(
                ParsedToolCall(name=c.name, arguments=c.arguments, id=c.id) for c in calls or ()
            ),
        )

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None:
        message = self.parser.parse_delta(
            delta_text, list(delta_ids), self.owner.request,
            prompt_token_ids=self.owner.prompt_ids, finished=finished,
        )  # fmt: skip
        if message is None:
            return None
        calls = [
            ToolCallDelta(
                index=call.index,
                id=call.id,
                name=call.function.name if call.function is not None else None,
                arguments=call.function.arguments if call.function is not None else None,
            )
            for call in message.tool_calls or ()
        ]
        return ParsedDelta(content=message.content, reasoning=message.reasoning, tool_calls=calls)
