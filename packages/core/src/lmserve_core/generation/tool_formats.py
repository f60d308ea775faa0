"""Tool calls in generated chat text without vLLM: the hermes, llama3_json, mistral and pythonic
formats, and what ``tool_choice`` "required" or a named function asks of the output.

Where vLLM is installed its own parsers serve (``lmserve_backend_vllm.output_parsers``); this
module is the pure-Python fallback behind the same seam (``OutputParsing``). vLLM's parsers of
the same names are the reference for what each format looks like and which outputs hold calls;
the code here is our own.

Formats (``FORMATS``, keyed by vLLM's ``--tool-call-parser`` names):

- ``hermes`` (alias ``qwen3_json``): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks; the content is the text before the first block; a last block the output ends inside
  counts when its JSON is complete.
- ``llama3_json`` (alias ``llama4_json``): JSON objects ``{"name": ..., "parameters": {...}}``
  (or ``"arguments"``), usually ``;``-separated and after ``<|python_tag|>``. As in vLLM every
  ``{`` outside an earlier object must open such an object, and text around them is dropped.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (an object alone
  is one call), or the v11+ form ``[TOOL_CALLS]name[ARGS]{...}`` / ``[TOOL_CALLS]name{...}``,
  one marker per call. The content is the text before the first marker.
- ``pythonic``: the whole output is a Python list of calls with literal keyword arguments,
  ``[get_weather(city="Paris"), f(a=1)]``, read with :mod:`ast` (never evaluated); JSON's
  ``true``/``false``/``null`` count as Python's ``True``/``False``/``None``.

Every extractor returns ``(content, calls)``: ``content`` None when nothing but whitespace is
left, each call's arguments as ``json.dumps(value, ensure_ascii=False)`` (vLLM's
serialisation). An output without a complete, valid call comes back unchanged with no calls.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from lmserve_core.errors import InvalidInput
from lmserve_core.generation.output_parsing import (
    ChoiceParser,
    ParsedDelta,
    ParsedOutput,
    ParsedToolCall,
    RequestAdjustments,
    RequestParsing,
    ToolCallDelta,
    ToolMode,
    tool_mode,
)
from lmserve_core.generation.params import StructuredOutput
from lmserve_protocols.openai import ChatCompletionRequest

Extracted = tuple[str | None, list[ParsedToolCall]]
Extractor = Callable[[str], Extracted]


def _arguments(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _safe(extract: Extractor) -> Extractor:
    """Pathologically deep JSON or Python (RecursionError) is no call either."""

    @functools.wraps(extract)
    def guarded(text: str) -> Extracted:
        try:
            return extract(text)
        except RecursionError:
            return text, []

    return guarded


def _content_before(text: str, end: int) -> str | None:
    head = text[:end]
    return head if head.strip() else None


def _named_call(obj: object, keys: tuple[str, ...]) -> ParsedToolCall | None:
    """``{"name": str, <one of keys>: value}`` as a call (the first key present wins)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in keys:
        if key in obj:
            return ParsedToolCall(name=obj["name"], arguments=_arguments(obj[key]))
    return None


# --- hermes -------------------------------------------------------------------------------

HERMES_START = "<tool_call>"
HERMES_END = "</tool_call>"


def _hermes_call(body: str) -> ParsedToolCall | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _named_call(obj, ("arguments",))


@_safe
def extract_hermes(text: str) -> Extracted:
    first = text.find(HERMES_START)
    if first < 0:
        return text, []
    calls: list[ParsedToolCall] = []
    pos = first
    while (start := text.find(HERMES_START, pos)) >= 0:
        body_start = start + len(HERMES_START)
        end = text.find(HERMES_END, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        call = _hermes_call(body)
        if call is None:  # one bad block and the whole output is content (vLLM's rule)
            return text, []
        calls.append(call)
        if end < 0:
            break
        pos = end + len(HERMES_END)
    return _content_before(text, first), calls


# --- llama3_json --------------------------------------------------------------------------

PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


@_safe
def extract_llama3_json(text: str) -> Extracted:
    calls: list[ParsedToolCall] = []
    pos = 0
    while (start := text.find("{", pos)) >= 0:
        try:
            obj, pos = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            return text, []
        call = _named_call(obj, ("arguments", "parameters"))
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return None, calls


# --- mistral ------------------------------------------------------------------------------

MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"


def _mistral_json_value(payload: str) -> object:
    """The first JSON value of ``payload``; failing that, the span from the first ``[{`` to
    the last ``}]``; None when neither is JSON."""
    try:
        return _DECODER.raw_decode(payload)[0]
    except (ValueError, RecursionError):
        pass
    start, end = payload.find("[{"), payload.rfind("}]")
    if start < 0 or end < start:
        return None
    try:
        return json.loads(payload[start : end + 2])
    except (ValueError, RecursionError):
        return None


def _mistral_list_calls(payload: str) -> list[ParsedToolCall]:
    value = _mistral_json_value(payload)
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        return []
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        args = item.get("arguments")
        if args is None:
            arguments = "{}"
        elif isinstance(args, str):  # already JSON text, kept as it is (as vLLM does)
            arguments = args
        else:
            arguments = _arguments(args)
        calls.append(ParsedToolCall(name=item["name"], arguments=arguments))
    return calls


def _mistral_named_call(segment: str) -> ParsedToolCall | None:
    """``name[ARGS]{...}`` or ``name{...}``; text after the arguments' JSON is dropped."""
    args_at, brace_at = segment.find(MISTRAL_ARGS), segment.find("{")
    if args_at >= 0 and (brace_at < 0 or args_at < brace_at):
        name, raw = segment[:args_at], segment[args_at + len(MISTRAL_ARGS) :]
    elif brace_at >= 0:
        name, raw = segment[:brace_at], segment[brace_at:]
    else:
        return None
    name, raw = name.strip(), raw.strip()
    if not name:
        return None
    if not raw:
        return ParsedToolCall(name=name, arguments="{}")
    try:
        value = _DECODER.raw_decode(raw)[0]
    except (ValueError, RecursionError):
        return None
    return ParsedToolCall(name=name, arguments=_arguments(value))


@_safe
def extract_mistral(text: str) -> Extracted:
    first = text.find(MISTRAL_TOOL_CALLS)
    if first < 0:
        return text, []
    segments = [s for s in text[first:].split(MISTRAL_TOOL_CALLS) if s.strip()]
    if not segments:
        return text, []
    calls: list[ParsedToolCall] = []
    if segments[0].lstrip().startswith(("[", "{")):
        # [TOOL_CALLS][{...}, ...]: one list; output after a later marker is trailing text.
        calls = _mistral_list_calls(segments[0].strip())
    else:
        for segment in segments:  # [TOOL_CALLS]name{...}[TOOL_CALLS]name{...}
            call = _mistral_named_call(segment)
            if call is None:
                return text, []
            calls.append(call)
    if not calls:
        return text, []
    return _content_before(text, first), calls


# --- pythonic -----------------------------------------------------------------------------

_PYTHONIC_NAME = re.compile(r"[A-Za-z]\w*")
_JSON_NAMES: dict[str, object] = {"true": True, "false": False, "null": None}


class _NotLiteral(Exception):
    pass


def _literal(node: ast.expr) -> object:
    """A keyword argument's value: literals only, as JSON can carry them."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _literal(node.operand)
        if isinstance(operand, bool) or not isinstance(operand, int | float):
            raise _NotLiteral
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.List | ast.Tuple | ast.Set):  # JSON has lists only
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[object, object] = {}
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            if key_node is None:  # {**other}
                raise _NotLiteral
            key = _literal(key_node)
            if not (key is None or isinstance(key, str | int | float)):
                raise _NotLiteral
            out[key] = _literal(value_node)
        return out
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(str(v.value) for v in node.values if isinstance(v, ast.Constant))
    raise _NotLiteral


def _pythonic_call(node: ast.expr) -> ParsedToolCall | None:
    if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
        return None
    if not _PYTHONIC_NAME.fullmatch(node.func.id):
        return None
    args: dict[str, object] = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            return None
        args[keyword.arg] = _literal(keyword.value)
    return ParsedToolCall(name=node.func.id, arguments=_arguments(args))


@_safe
def extract_pythonic(text: str) -> Extracted:
    source = text.strip()
    if not source.startswith("["):
        return text, []
    try:
        with warnings.catch_warnings():  # invalid escapes in strings: still literals
            warnings.simplefilter("ignore")
            tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return text, []
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return text, []
    calls = []
    for node in tree.body.elts:
        try:
            call = _pythonic_call(node)
        except _NotLiteral:
            call = None
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


# --- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolFormat:
    """A tool-call format: its extractor and where, in a stream, calls may begin."""

    name: str
    extract: Extractor
    # Calls begin at this marker, anywhere in the output; the text before it is content.
    marker: str | None = None
    # Or: calls are the whole output, which starts (after whitespace) with one of these.
    openers: tuple[str, ...] = ()
    # Calls are (start, end)-delimited blocks, each sent as soon as it closes (hermes); the
    # function reads one block's body (None: not a call).
    blocks: tuple[str, str, Callable[[str], ParsedToolCall | None]] | None = None


_HERMES = ToolFormat(
    "hermes",
    extract_hermes,
    marker=HERMES_START,
    blocks=(HERMES_START, HERMES_END, _hermes_call),
)
_LLAMA3_JSON = ToolFormat("llama3_json", extract_llama3_json, openers=("{", PYTHON_TAG))
_MISTRAL = ToolFormat("mistral", extract_mistral, marker=MISTRAL_TOOL_CALLS)
_PYTHONIC = ToolFormat("pythonic", extract_pythonic, openers=("[",))

# vLLM's --tool-call-parser names, with vLLM's aliases of the same formats.
FORMATS: dict[str, ToolFormat] = {
    "hermes": _HERMES,
    "qwen3_json": _HERMES,
    "llama3_json": _LLAMA3_JSON,
    "llama4_json": _LLAMA3_JSON,
    "mistral": _MISTRAL,
    "pythonic": _PYTHONIC,
}


# --- tool_choice "required" and named: the schema the output must match -----------------

_EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


def _plain(value: object) -> object:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _functions(tools: Sequence[object]) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, parameters schema) of each function tool (tools as dicts or pydantic models)."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for tool in tools:
        data = _plain(tool)
        if not isinstance(data, Mapping) or data.get("type", "function") != "function":
            continue
        function = data.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        params = function.get("parameters")
        out.append((function["name"], params if isinstance(params, dict) else None))
    return out


def _named_function(tool_choice: object) -> str | None:
    """The function a ``{"type": "function", "function": {"name": X}}`` choice names."""
    data = _plain(tool_choice)
    if not isinstance(data, Mapping):
        return None
    function = data.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": "my_function"}}'
        )
    name: str = function["name"]
    return name


def json_schema_for_tool_choice(
    tools: Sequence[object] | None,
    tool_choice: object,
    parallel_tool_calls: bool | None = True,
) -> dict[str, Any] | None:
    """What the output must match for ``tool_choice`` (vLLM's ``get_json_schema_from_tools``).

    A named function: its parameters schema (an empty object's when it has none). "required":
    a JSON array (``minItems`` 1, ``maxItems`` 1 when ``parallel_tool_calls`` is False) of
    ``{"name": <the tool's name>, "parameters": <its schema>}``, one ``anyOf`` branch per tool,
    every tool's ``$defs`` merged at the top. None for "auto", "none", None or no tools.
    Raises ValueError for a function that is not among the tools, or clashing ``$defs``.
    """
    if not tools or tool_choice is None or tool_choice in ("none", "auto"):
        return None
    functions = _functions(tools)
    named = _named_function(tool_choice)
    if named is not None:
        for name, params in functions:
            if name == named:
                return copy.deepcopy(params) if params else dict(_EMPTY_OBJECT)
        raise ValueError(f"Tool '{named}' has not been passed in `tools`.")
    if tool_choice != "required":
        raise ValueError(f'invalid tool_choice {tool_choice!r}: "none", "auto" or "required"')
    if not functions:
        raise ValueError("tool_choice requires a function call, but tools has no function")
    branches: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for name, params in functions:
        schema = copy.deepcopy(params) if params else dict(_EMPTY_OBJECT)
        own_defs = schema.pop("$defs", {})
        if not isinstance(own_defs, dict):
            raise ValueError(f"`$defs` in the parameters of tool '{name}' must be an object")
        for def_name, def_schema in own_defs.items():
            if def_name in defs and defs[def_name] != def_schema:
                raise ValueError(
                    f"Tool definition '{def_name}' has multiple schemas, which is not supported."
                )
            defs[def_name] = def_schema
        branches.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": schema,
                },
                "required": ["name", "parameters"],
            }
        )
    out: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": branches},
    }
    if parallel_tool_calls is False:
        out["maxItems"] = 1
    if defs:
        out["$defs"] = defs
    return out


# --- choice parsers -----------------------------------------------------------------------


def _partial_suffix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class _PassThrough:
    """No tool parsing: the text is the content."""

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput:
        return ParsedOutput(content=text)

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None:
        return ParsedDelta(content=delta_text) if delta_text else None


class _NamedChoice:
    """tool_choice names a function: the (schema-held) output is its arguments."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._text = ""
        self._sent = -1  # arguments streamed: text[start:_sent]; -1 before the first piece

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput:
        arguments = text.strip()
        if not arguments:
            return ParsedOutput(content=None)
        return ParsedOutput(content=None, tool_calls=(ParsedToolCall(self._name, arguments),))

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None:
        self._text += delta_text
        first = self._sent < 0
        if first:
            stripped = self._text.lstrip()
            if not stripped:
                return None
            self._sent = len(self._text) - len(stripped)
        end = len(self._text.rstrip())  # trailing whitespace waits: it may be the last
        if end <= self._sent:
            return None
        piece, self._sent = self._text[self._sent : end], end
        call = ToolCallDelta(index=0, name=self._name if first else None, arguments=piece)
        return ParsedDelta(tool_calls=[call])


def _required_calls(text: str) -> list[ParsedToolCall]:
    """The calls of a "required" output: ``[{"name": ..., "parameters": {...}}, ...]``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return []
    if not isinstance(value, list):
        return []
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        params = item.get("parameters")
        if params is not None and not isinstance(params, dict):
            return []
        calls.append(ParsedToolCall(name=item["name"], arguments=_arguments(params or {})))
    return calls


class _RequiredChoice:
    """tool_choice "required": the (schema-held) output is a JSON array of calls."""

    def __init__(self) -> None:
        self._text = ""

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput:
        calls = _required_calls(text)
        if calls:
            return ParsedOutput(content=None, tool_calls=tuple(calls))
        return ParsedOutput(content=text if text.strip() else None)

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None:
        self._text += delta_text
        if not finished:
            return None
        parsed = self.parse(self._text, ())
        out = ParsedDelta(
            content=parsed.content,
            tool_calls=[
                ToolCallDelta(index=i, name=call.name, arguments=call.arguments)
                for i, call in enumerate(parsed.tool_calls)
            ],
        )
        return None if out.empty else out


class _AutoChoice:
    """tool_choice "auto" with a format: content streams as it comes, except what may begin a
    call; calls go out whole, each once it is complete (hermes) or at the end (the others)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self._fmt = fmt
        self._text = ""
        self._sent = 0  # content sent: text[:_sent] (or, in "plain", everything up to _sent)
        self._state: Literal["content", "calls", "plain"] = "content"
        self._checked = 0  # the marker is not in text[:_checked - len(marker) + 1]
        self._scan = 0  # calls state: where the next call is looked for
        self._calls = 0  # calls sent

    def parse(self, text: str, token_ids: Sequence[int]) -> ParsedOutput:
        content, calls = self._fmt.extract(text)
        return ParsedOutput(content=content, tool_calls=tuple(calls))

    def parse_delta(
        self, delta_text: str, delta_ids: Sequence[int], *, finished: bool
    ) -> ParsedDelta | None:
        self._text += delta_text
        out = ParsedDelta()
        if self._state == "content":
            self._content(out, finished)
        if self._state == "calls":
            self._calls_step(out, finished)
        if self._state == "plain":
            self._send(out, len(self._text))
        return None if out.empty else out

    def _send(self, out: ParsedDelta, end: int) -> None:
        if end > self._sent:
            out.content = (out.content or "") + self._text[self._sent : end]
            self._sent = end

    def _send_call(self, out: ParsedDelta, call: ParsedToolCall) -> None:
        out.tool_calls.append(
            ToolCallDelta(index=self._calls, name=call.name, arguments=call.arguments)
        )
        self._calls += 1

    def _content(self, out: ParsedDelta, finished: bool) -> None:
        text, marker = self._text, self._fmt.marker
        if marker is not None:
            at = text.find(marker, max(0, self._checked - len(marker) + 1))
            self._checked = len(text)
            if at >= 0:
                if text[:at].strip():  # whitespace alone before the calls is no content
                    self._send(out, at)
                self._state, self._scan = "calls", at
                return
            end = len(text) if finished else len(text) - _partial_suffix(text, marker)
            # (content went out already, or there is some besides whitespace)
            if finished or self._sent > 0 or text[:end].strip():
                self._send(out, end)
            return
        head = text.lstrip()
        if not head:
            if finished:
                self._send(out, len(text))
            return
        if head.startswith(self._fmt.openers):
            self._state = "calls"
        elif finished or not any(o.startswith(head) for o in self._fmt.openers):
            self._state = "plain"

    def _calls_step(self, out: ParsedDelta, finished: bool) -> None:
        if self._fmt.blocks is not None:
            self._blocks(out, finished, *self._fmt.blocks)
            return
        if not finished:
            return
        _, calls = self._fmt.extract(self._text)
        if not calls:  # no call after all: the whole output is content
            self._state = "plain"
            return
        for call in calls:
            self._send_call(out, call)

    def _blocks(
        self,
        out: ParsedDelta,
        finished: bool,
        start: str,
        end: str,
        read: Callable[[str], ParsedToolCall | None],
    ) -> None:
        text = self._text
        while (at := text.find(start, self._scan)) >= 0:
            body_at = at + len(start)
            close = text.find(end, body_at)
            if close < 0 and not finished:
                return  # the call is not complete yet
            body = text[body_at:] if close < 0 else text[body_at:close]
            self._scan = len(text) if close < 0 else close + len(end)
            call = read(body)
            if call is not None:
                self._send_call(out, call)
            elif self._calls == 0:  # the first call is bad: the whole output is content
                self._state = "plain"
                return
            else:  # calls already went out: this bad one goes out as content
                out.content = (out.content or "") + text[at : self._scan]
            if close < 0:
                return


@dataclass(frozen=True)
class _RequestParsing:
    adjustments: RequestAdjustments
    active: bool
    mode: ToolMode
    format: ToolFormat | None
    function: str | None = None

    def new_choice(self) -> ChoiceParser:
        if self.mode == "named" and self.function is not None:
            return _NamedChoice(self.function)
        if self.mode == "required":
            return _RequiredChoice()
        if self.active and self.format is not None:
            return _AutoChoice(self.format)
        return _PassThrough()

    def reasoning_gate(self) -> None:
        return None  # no reasoning parsers without vLLM


class FormatOutputParsing:
    """``OutputParsing`` without vLLM: tool calls in one of ``FORMATS`` (no reasoning parsers).

    ``format_name`` is ``--tool-call-parser`` (None: none), ``enable_auto_tool_choice`` is
    ``--enable-auto-tool-choice``: without both, "auto" leaves the output as content.
    "required" and a named function need no format: the output is held to the tools' schema.
    """

    def __init__(self, format_name: str | None, enable_auto_tool_choice: bool) -> None:
        if format_name is not None and format_name not in FORMATS:
            raise ValueError(
                f"unknown tool call parser {format_name!r}; without vLLM the known ones are "
                + ", ".join(sorted(FORMATS))
            )
        self.format = FORMATS[format_name] if format_name is not None else None
        self.enable_auto_tool_choice = enable_auto_tool_choice

    def reasoning_gate(self) -> None:
        return None  # no reasoning parsers without vLLM

    def for_request(
        self, request: ChatCompletionRequest, prompt_ids: Sequence[int]
    ) -> RequestParsing:
        mode = tool_mode(request)
        tools: Sequence[object] = request.tools or []
        if mode == "none":
            return _RequestParsing(RequestAdjustments(), active=False, mode=mode, format=None)
        try:
            schema = json_schema_for_tool_choice(
                tools, request.tool_choice, request.parallel_tool_calls
            )
        except ValueError as exc:
            param = "tool_choice" if mode == "named" else "tools"
            raise InvalidInput(str(exc), param=param) from None
        structured = (
            StructuredOutput(kind="json", value=json.dumps(schema)) if schema is not None else None
        )
        adjustments = RequestAdjustments(
            structured=structured,
            # Tool-call markers are special tokens in some models: the parser must see them.
            skip_special_tokens=False if self.format is not None else None,
        )
        if mode == "named":
            return _RequestParsing(
                adjustments,
                active=True,
                mode=mode,
                format=self.format,
                function=_named_function(request.tool_choice),
            )
        if mode == "required":
            return _RequestParsing(adjustments, active=True, mode=mode, format=self.format)
        active = self.enable_auto_tool_choice and self.format is not None
        return _RequestParsing(adjustments, active=active, mode=mode, format=self.format)
