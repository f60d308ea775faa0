"""Tool calls without vLLM (lmserve_core.generation.tool_formats): each format parsed whole and
streamed in pieces, the schema of tool_choice "required"/named, the per-request parsing, and
parity with vLLM's own parsers and schema builder on the same outputs."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest

from _support.tiny_models import model_path
from lmserve_core.errors import InvalidInput
from lmserve_core.generation.output_parsing import ChoiceParser, ParsedToolCall
from lmserve_core.generation.tool_formats import (
    FORMATS,
    FormatOutputParsing,
    extract_hermes,
    extract_llama3_json,
    extract_mistral,
    extract_pythonic,
    json_schema_for_tool_choice,
)
from lmserve_protocols.openai import ChatCompletionRequest

Call = tuple[str, Any]  # (name, arguments parsed from their JSON)


def calls_of(calls: list[ParsedToolCall] | tuple[ParsedToolCall, ...]) -> list[Call]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# (format, model output, content, calls): what the non-streaming parse gives.
CASES: list[tuple[str, str, str | None, list[Call]]] = [
    # hermes
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        "Let me check.\n",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes",
        '<tool_call>{"name": "search", "arguments": {"q": {"deep": [1, {"x": "é"}]}, '
        '"emoji": "🌍 中文"}}</tool_call>\n<tool_call>{"name": "noop", "arguments": {}}'
        "</tool_call>",
        None,
        [("search", {"q": {"deep": [1, {"x": "é"}]}, "emoji": "🌍 中文"}), ("noop", {})],
    ),
    (
        "hermes",
        '\n\n<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\nDone, as you asked.',
        None,  # whitespace alone before the call is no content; text after the calls is dropped
        [("f", {"a": 1})],
    ),
    (
        "hermes",
        'A <b>bold</b> a < b <tool_call>{"name": "f", "arguments": {"a": [true, null]}}',
        "A <b>bold</b> a < b ",  # the last block, unterminated, has complete JSON
        [("f", {"a": [True, None]})],
    ),
    ("hermes", "Hello <b>world</b>, 1 < 2 and <tool_", "Hello <b>world</b>, 1 < 2 and <tool_", []),
    ("hermes", "  \n", "  \n", []),
    (
        "hermes",
        'x <tool_call>{"name": "f", "arguments": {"a": }}</tool_call>',
        'x <tool_call>{"name": "f", "arguments": {"a": }}</tool_call>',
        [],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "args": {"a": 1}}</tool_call>',
        '<tool_call>{"name": "f", "args": {"a": 1}}</tool_call>',
        [],
    ),
    # llama3_json
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        ' \n{"name": "a", "parameters": {"x": [1, 2, {"y": "ü€"}]}}; '
        '{"name": "b", "arguments": {"z": null}}',
        None,
        [("a", {"x": [1, 2, {"y": "ü€"}]}), ("b", {"z": None})],
    ),
    ("llama3_json", "The answer is 42.", "The answer is 42.", []),
    ("llama3_json", "<|python_tag|>print('hi')", "<|python_tag|>print('hi')", []),
    (
        "llama3_json",
        '{"name": "f", "parameters": {"a": }',
        '{"name": "f", "parameters": {"a": }',
        [],
    ),
    ("llama3_json", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("llama3_json", "<|pyth", "<|pyth", []),
    # mistral
    (
        "mistral",
        'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "Sure.",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "a", "arguments": {"n": {"m": [1, "ß"]}}}, '
        '{"name": "b", "arguments": {}}]',
        None,
        [("a", {"n": {"m": [1, "ß"]}}), ("b", {})],
    ),
    (
        "mistral",
        '\n[TOOL_CALLS]{"name": "f", "arguments": {"a": 1}}',
        None,
        [("f", {"a": 1})],
    ),
    (
        "mistral",
        'Calling.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f{"a": {"b": [1]}}',
        "Calling.",
        [("get_weather", {"city": "Paris"}), ("f", {"a": {"b": [1]}})],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}] and then some',
        None,
        [("f", {"a": 1})],
    ),
    ("mistral", "Use [brackets] like [TOOL", "Use [brackets] like [TOOL", []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {',
        '[TOOL_CALLS][{"name": "f", "arguments": {',
        [],
    ),
    ("mistral", '[TOOL_CALLS]f{"a": ', '[TOOL_CALLS]f{"a": ', []),
    # pythonic
    ("pythonic", '[get_weather(city="Paris")]', None, [("get_weather", {"city": "Paris"})]),
    (
        "pythonic",
        "[a(x={'k': [1, 2.5, None, True]}, s='ü 🌍'), b(flag=true, none=null, neg=-3, "
        "tup=(1, 2), st={7}, f=f'x')]",
        None,
        [
            ("a", {"x": {"k": [1, 2.5, None, True]}, "s": "ü 🌍"}),
            ("b", {"flag": True, "none": None, "neg": -3, "tup": [1, 2], "st": [7], "f": "x"}),
        ],
    ),
    ("pythonic", "[noop()]\n", None, [("noop", {})]),
    # vLLM's parser refuses the indent (ast.parse of the raw output); the stream could not
    # tell such an output from one without it
    ("pythonic", " \n[f(a=1)]", None, [("f", {"a": 1})]),
    ("pythonic", "Paris is the capital.", "Paris is the capital.", []),
    ("pythonic", "[f(x=g(1))]", "[f(x=g(1))]", []),
    ("pythonic", "[f(1)]", "[f(1)]", []),
    ("pythonic", "[1, 2]", "[1, 2]", []),
    ("pythonic", "[f(a=1)", "[f(a=1)", []),
    ("pythonic", "[f(a=1)] and more", "[f(a=1)] and more", []),
    ("pythonic", "[os.system(cmd='ls')]", "[os.system(cmd='ls')]", []),
    ("pythonic", "[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
]

EXTRACTORS = {
    "hermes": extract_hermes,
    "llama3_json": extract_llama3_json,
    "mistral": extract_mistral,
    "pythonic": extract_pythonic,
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
                "required": ["city"],
                "$defs": {"unit": {"type": "string", "enum": ["C", "F"]}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert",
            "parameters": {
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/unit"}, "value": {"type": "number"}},
                "$defs": {"unit": {"type": "string", "enum": ["C", "F"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "noop"}},
]


def _case_id(case: tuple[str, str, str | None, list[Call]]) -> str:
    return f"{case[0]}:{case[1][:30]!r}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_extract(case: tuple[str, str, str | None, list[Call]]) -> None:
    fmt, text, content, calls = case
    got_content, got_calls = EXTRACTORS[fmt](text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    for call in got_calls:  # vLLM's serialisation of the arguments
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)
        assert call.id is None
    if not calls:
        assert got_content == text  # no call: the text comes back unchanged


def test_mistral_string_arguments_are_kept_as_they_come() -> None:
    content, calls = extract_mistral('[TOOL_CALLS][{"name": "f", "arguments": "{\\"a\\": 1}"}]')
    assert content is None
    assert calls == [ParsedToolCall(name="f", arguments='{"a": 1}')]
    _, calls = extract_mistral('[TOOL_CALLS][{"name": "f"}]')
    assert calls == [ParsedToolCall(name="f", arguments="{}")]


def test_registry_has_vllms_names_and_aliases() -> None:
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(FORMATS)
    assert FORMATS["qwen3_json"] is FORMATS["hermes"]
    assert FORMATS["llama4_json"] is FORMATS["llama3_json"]
    for name, fmt in FORMATS.items():
        if name in EXTRACTORS:
            assert fmt.extract is EXTRACTORS[name]


# --- streaming ----------------------------------------------------------------------------


def request(tool_choice: Any = None, tools: Any = TOOLS, **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,
        tool_choice=tool_choice,
        **kw,
    )


def chooser(fmt: str, tool_choice: Any = "auto", **kw: Any) -> Callable[[], ChoiceParser]:
    parsing = FormatOutputParsing(fmt, enable_auto_tool_choice=True).for_request(
        request(tool_choice, **kw), [1, 2, 3]
    )
    assert parsing.active
    return parsing.new_choice


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def stream(
    choice: ChoiceParser, parts: list[str], *, extra_final: bool = False
) -> tuple[str | None, list[tuple[str, str]], list[Any]]:
    """Feed ``parts`` (the last with finished=True, or an empty one after them), reassemble."""
    content = ""
    calls: list[list[str]] = []
    deltas = []
    feed = [*parts, ""] if extra_final else parts
    for i, part in enumerate(feed):
        delta = choice.parse_delta(part, [], finished=i == len(feed) - 1)
        deltas.append(delta)
        if delta is None:
            continue
        assert not delta.empty
        assert delta.reasoning is None
        content += delta.content or ""
        for tc in delta.tool_calls:
            if tc.index == len(calls):  # a new call: its first piece names it
                assert tc.name is not None and tc.id is None
                calls.append([tc.name, tc.arguments or ""])
            else:
                assert tc.index == len(calls) - 1 and tc.name is None
                calls[tc.index][1] += tc.arguments or ""
    return content or None, [(n, a) for n, a in calls], deltas


@pytest.mark.parametrize("size", [1, 3, 7])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_streaming_matches_whole(case: tuple[str, str, str | None, list[Call]], size: int) -> None:
    fmt, text, _, _ = case
    new_choice = chooser(fmt)
    whole = new_choice().parse(text, [])
    expected = (whole.content or None, [(c.name, c.arguments) for c in whole.tool_calls])
    for extra_final in (False, True):
        content, calls, _ = stream(new_choice(), pieces(text, size), extra_final=extra_final)
        assert (content, calls) == expected


def test_streaming_sends_content_early_and_hermes_calls_as_they_close() -> None:
    choice = chooser("hermes")()
    delta = choice.parse_delta("Let me ", [], finished=False)
    assert delta is not None and delta.content == "Let me "
    delta = choice.parse_delta("check <tool", [], finished=False)
    assert delta is not None and delta.content == "check "  # "<tool" may open a call: held
    assert choice.parse_delta('_call>{"name": "f", "arguments": {"a"', [], finished=False) is None
    delta = choice.parse_delta(": 1}}</tool_call>\n<tool_call>", [], finished=False)
    assert delta is not None and delta.content is None
    assert [(c.index, c.name, c.arguments) for c in delta.tool_calls] == [(0, "f", '{"a": 1}')]
    delta = choice.parse_delta('{"name": "g", "arguments": {}}', [], finished=True)
    assert delta is not None
    assert [(c.index, c.name, c.arguments) for c in delta.tool_calls] == [(1, "g", "{}")]


def test_streaming_leading_whitespace_waits_for_what_follows() -> None:
    choice = chooser("mistral")()
    assert choice.parse_delta("\n ", [], finished=False) is None
    delta = choice.parse_delta("Hi", [], finished=False)
    assert delta is not None and delta.content == "\n Hi"
    choice = chooser("pythonic")()
    assert choice.parse_delta("  ", [], finished=False) is None
    delta = choice.parse_delta("Par", [], finished=False)
    assert delta is not None and delta.content == "  Par"
    choice = chooser("llama3_json")()
    assert choice.parse_delta(" <|py", [], finished=False) is None
    assert choice.parse_delta("thon_tag|>", [], finished=False) is None  # a call may follow
    delta = choice.parse_delta('{"name": "f", "parameters": {}}', [], finished=True)
    assert delta is not None and [(c.name, c.arguments) for c in delta.tool_calls] == [("f", "{}")]


def test_llama3_json_text_before_the_call_streams_as_content() -> None:
    """vLLM's two paths differ here, and so do ours: the whole output finds the call after
    the text (and drops the text), a stream has sent the text before any JSON came."""
    text = 'Sure: {"name": "f", "parameters": {"a": 1}}'
    assert extract_llama3_json(text) == (None, [ParsedToolCall("f", '{"a": 1}')])
    content, calls, _ = stream(chooser("llama3_json")(), pieces(text, 3))
    assert (content, calls) == (text, [])


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>{"name": "g", "arguments": }</tool_call>',
        '\n<tool_call>{"name": "g", "argum',  # cut off by max_tokens
    ],
)
def test_hermes_bad_block_after_a_streamed_call_goes_out_as_content(bad: str) -> None:
    """The whole output is content when any block is bad (vLLM's rule), but a stream cannot
    take back a call it sent: the bad block goes out as content after it."""
    good = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert extract_hermes(good + bad) == (good + bad, [])
    content, calls, _ = stream(chooser("hermes")(), pieces(good + bad, 5))
    assert (content, calls) == (bad.lstrip(), [("f", "{}")])


# --- tool_choice "required" and named -----------------------------------------------------


def test_required_parse_and_stream() -> None:
    new_choice = chooser("hermes", "required")
    text = (
        ' [{"name": "get_weather", "parameters": {"city": "Köln", "unit": "C"}}, '
        '{"name": "noop", "parameters": {}}]'
    )
    parsed = new_choice().parse(text, [])
    assert parsed.content is None and parsed.reasoning is None
    assert calls_of(parsed.tool_calls) == [
        ("get_weather", {"city": "Köln", "unit": "C"}),
        ("noop", {}),
    ]
    for size in (1, 3, 7):
        content, calls, deltas = stream(new_choice(), pieces(text, size))
        assert content is None
        assert calls == [(c.name, c.arguments) for c in parsed.tool_calls]
        assert all(d is None for d in deltas[:-1])  # the calls go out at the end, whole
    bad = '[{"name": "get_weather", "parameters": {"ci'  # cut off by max_tokens
    assert new_choice().parse(bad, []).content == bad
    assert new_choice().parse(bad, []).tool_calls == ()
    assert stream(new_choice(), pieces(bad, 4))[:2] == (bad, [])


def test_named_parse_and_stream() -> None:
    new_choice = chooser("hermes", {"type": "function", "function": {"name": "get_weather"}})
    text = '\n {"city": "Zürich",\n "unit": "C"}  \n'
    parsed = new_choice().parse(text, [])
    assert parsed.content is None
    assert parsed.tool_calls == (ParsedToolCall("get_weather", text.strip()),)
    for size in (1, 3, 7):
        content, calls, deltas = stream(new_choice(), pieces(text, size))
        assert content is None and calls == [("get_weather", text.strip())]
        assert len([d for d in deltas if d is not None]) > 1  # the arguments stream as they come
    empty = new_choice().parse("  ", [])
    assert empty.content is None and empty.tool_calls == ()
    assert stream(new_choice(), [" ", "\n"])[:2] == (None, [])


# --- the per-request parsing --------------------------------------------------------------


def test_unknown_format_is_a_startup_error() -> None:
    with pytest.raises(ValueError, match="hermes") as info:
        FormatOutputParsing("nonesuch", enable_auto_tool_choice=True)
    assert "nonesuch" in str(info.value) and "pythonic" in str(info.value)


def test_request_adjustments_and_activity() -> None:
    parsing = FormatOutputParsing("hermes", enable_auto_tool_choice=True)
    for req in (request(tools=None), request("none")):
        rp = parsing.for_request(req, [])
        assert not rp.active
        assert rp.adjustments.structured is None and rp.adjustments.skip_special_tokens is None
        assert rp.new_choice().parse("<tool_call>x", []).content == "<tool_call>x"
    rp = parsing.for_request(request(), [])  # tools, no tool_choice: auto
    assert rp.active and rp.adjustments.structured is None
    assert rp.adjustments.skip_special_tokens is False
    assert rp.new_choice().parse('<tool_call>{"name": "noop", "arguments": {}}', []).tool_calls

    off = FormatOutputParsing("hermes", enable_auto_tool_choice=False).for_request(request(), [])
    assert not off.active
    text = '<tool_call>{"name": "noop", "arguments": {}}</tool_call>'
    assert off.new_choice().parse(text, []).content == text
    no_format = FormatOutputParsing(None, enable_auto_tool_choice=True)
    assert not no_format.for_request(request("auto"), []).active
    assert no_format.for_request(request("auto"), []).adjustments.skip_special_tokens is None

    for fp in (parsing, no_format):  # "required" and named need no format
        rp = fp.for_request(request("required", parallel_tool_calls=False), [])
        assert rp.active
        assert rp.adjustments.structured is not None
        assert rp.adjustments.structured.kind == "json"
        schema = json.loads(rp.adjustments.structured.value)
        assert schema == json_schema_for_tool_choice(TOOLS, "required", False)
        assert schema["maxItems"] == 1
        named = {"type": "function", "function": {"name": "noop"}}
        rp = fp.for_request(request(named), [])
        assert rp.adjustments.structured is not None
        assert json.loads(rp.adjustments.structured.value) == {"type": "object", "properties": {}}
        assert rp.new_choice().parse("{}", []).tool_calls == (ParsedToolCall("noop", "{}"),)


def test_request_errors() -> None:
    parsing = FormatOutputParsing("pythonic", enable_auto_tool_choice=True)
    with pytest.raises(InvalidInput) as info:
        parsing.for_request(request("required", tools=None), [])
    assert info.value.param == "tool_choice"
    with pytest.raises(InvalidInput, match="nope") as info:
        parsing.for_request(request({"type": "function", "function": {"name": "nope"}}), [])
    assert info.value.param == "tool_choice"
    clash = copy.deepcopy(TOOLS)
    clash[1]["function"]["parameters"]["$defs"]["unit"] = {"type": "integer"}
    with pytest.raises(InvalidInput, match="multiple schemas") as info:
        parsing.for_request(request("required", tools=clash), [])
    assert info.value.param == "tools"


# --- the schema, against vLLM's -----------------------------------------------------------


def test_schema_for_tool_choice() -> None:
    tools = copy.deepcopy(TOOLS)
    schema = json_schema_for_tool_choice(tools, "required", True)
    assert tools == TOOLS  # the request's tools are left as they were
    assert schema is not None and "maxItems" not in schema and schema["minItems"] == 1
    assert schema["$defs"] == {"unit": {"type": "string", "enum": ["C", "F"]}}
    single = json_schema_for_tool_choice(tools, "required", False)
    assert single is not None and single["maxItems"] == 1
    for choice in ("auto", "none", None):
        assert json_schema_for_tool_choice(tools, choice, True) is None
    assert json_schema_for_tool_choice(None, "required", True) is None
    named = json_schema_for_tool_choice(
        tools, {"type": "function", "function": {"name": "get_weather"}}, True
    )
    assert named == TOOLS[0]["function"]["parameters"]
    with pytest.raises(ValueError, match="nope"):
        json_schema_for_tool_choice(tools, {"type": "function", "function": {"name": "nope"}})

    # What it means: good outputs pass, bad ones fail.
    good = [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}]
    jsonschema.validate(good, schema)
    jsonschema.validate([*good, {"name": "noop", "parameters": {}}], schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {"unit": "C"}}],  # city is required
        [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "K"}}],
        [{"name": "unknown", "parameters": {}}],
        [{"name": "noop"}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good * 2, single)


@pytest.mark.parametrize("parallel", [True, False, None])
def test_schema_matches_vllm(parallel: bool | None) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam,
        ChatCompletionToolsParam,
    )
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    def theirs(choice: Any) -> Any:  # vLLM pops $defs out of the tools it is given
        tools = [ChatCompletionToolsParam.model_validate(t) for t in copy.deepcopy(TOOLS)]
        return get_json_schema_from_tools(choice, tools, parallel)

    assert json_schema_for_tool_choice(TOOLS, "required", parallel) == theirs("required")
    for name in ("get_weather", "convert", "noop"):
        named = {"type": "function", "function": {"name": name}}
        vllm_named = ChatCompletionNamedToolChoiceParam.model_validate(named)
        assert json_schema_for_tool_choice(TOOLS, named, parallel) == theirs(vllm_named)
    for choice in ("auto", "none"):
        assert json_schema_for_tool_choice(TOOLS, choice, parallel) is None is theirs(choice)


# --- parity with vLLM's parsers -----------------------------------------------------------

PARITY: dict[str, list[str]] = {
    "hermes": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        'Checking.\n<tool_call>{"name": "a", "arguments": {"q": {"deep": [1, "é"]}}}</tool_call>'
        '\n<tool_call>{"name": "b", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": "🌍"}}',
        '<tool_call>{"name": "f", "arguments": {"x": }}</tool_call>',
        '<tool_call>{"name": "f"}</tool_call>',
        "No tools needed: 4.",
    ],
    "llama3_json": [
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "a", "parameters": {"n": {"m": [1, "ü"]}}}; {"name": "b", "arguments": {}}',
        'Sure: {"name": "f", "parameters": {"a": 1}}',
        '{"name": "f", "parameters": {"a": }',
        '{"city": "Paris"}',
        "Plain words.",
    ],
    "mistral": [
        'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        '[TOOL_CALLS] [{"name": "a", "arguments": {"n": {"m": [1, "ß"]}}}, '
        '{"name": "b", "arguments": {}}]',
        '[TOOL_CALLS]{"name": "f", "arguments": {"a": 1}}',
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}] trailing',
        "No call here.",
    ],
    "mistral_v11": [
        'Calling.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        '[TOOL_CALLS]a[ARGS]{"n": {"m": [1, "ß"]}}[TOOL_CALLS]b{"k": "v"}',
        '[TOOL_CALLS]f{"a": 1} and more words',
        "No call here.",
    ],
    "pythonic": [
        '[get_weather(city="Paris")]',
        "[a(x={'k': [1, 2.5, None, True]}, s='ü'), b(flag=true, none=null, neg=-3, t=(1, 2))]",
        "[noop()]",
        "[f(x=g(1))]",
        "[f(a=1)] trailing",
        "The capital is Paris.",
    ],
}

VLLM_PARSERS = {
    "hermes": ("hermes", []),
    "llama3_json": ("llama3_json", ["<|python_tag|>"]),
    "mistral": ("mistral", ["[TOOL_CALLS]"]),  # no [ARGS] in the vocabulary: pre-v11
    "mistral_v11": ("mistral", ["[TOOL_CALLS]", "[ARGS]"]),
    "pythonic": ("pythonic", []),
}


def _norm(content: str | None) -> str:
    # vLLM keeps whitespace-only content before a call (hermes) and strips content in its
    # v11 mistral path; ours is None and unstripped: compare the text itself.
    return (content or "").strip()


@pytest.fixture(scope="module")
def vllm_extract() -> Iterator[Callable[[str, str], tuple[str | None, list[Call]]]]:
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VllmRequest,
    )
    from vllm.tool_parsers import ToolParserManager

    tools = [
        {"type": "function", "function": {"name": n}}
        for n in ("get_weather", "a", "b", "f", "noop")
    ]
    req = VllmRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools)
    tokenizers: dict[str, Any] = {}

    def run(key: str, text: str) -> tuple[str | None, list[Call]]:
        name, special = VLLM_PARSERS[key]
        if key not in tokenizers:
            tok = AutoTokenizer.from_pretrained(model_path("llama"))
            if special:
                tok.add_special_tokens({"additional_special_tokens": special})
            tokenizers[key] = tok
        parser = ToolParserManager.get_tool_parser(name)(tokenizers[key], req.tools)
        info = parser.extract_tool_calls(text, req)
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]
        return info.content, calls

    yield run


@pytest.mark.parametrize(
    "key,text", [(k, t) for k, texts in PARITY.items() for t in texts], ids=lambda v: str(v)[:30]
)
def test_parity_with_vllm(
    vllm_extract: Callable[[str, str], tuple[str | None, list[Call]]], key: str, text: str
) -> None:
    ours_content, ours_calls = EXTRACTORS[key.removesuffix("_v11")](text)
    theirs_content, theirs_calls = vllm_extract(key, text)
    assert calls_of(ours_calls) == theirs_calls
    if theirs_calls or key != "mistral":
        assert _norm(ours_content) == _norm(theirs_content)
    else:
        # vLLM's pre-v11 path gives only the text after [TOOL_CALLS] back when it holds no
        # call; we give back the whole output, as every format does.
        assert ours_content == text
