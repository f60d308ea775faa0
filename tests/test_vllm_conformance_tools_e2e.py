"""Differential conformance for tools, structured outputs and reasoning (issue 17): the same
requests to vLLM's own OpenAI server and to lmserve on both backends, all started with vLLM's
``--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser deepseek_r1`` on a tiny
model trained to call a weather tool and to think (``tiny_models`` "tools").

Compared as ``test_vllm_conformance_e2e`` compares (``_support.conformance``), plus each
message's reasoning and tool calls (name and parsed arguments; ids are random). The module
prints the match rate; every request must match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from _support.conformance import Case, compare
from _support.servers import ServerProcess
from _support.tiny_model_checks import WEATHER_TOOL as TOOL
from _support.tiny_models import model_path
from _support.vllm_reference import start_vllm_reference

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

PARSERS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--reasoning-parser", "deepseek_r1")  # fmt: skip
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
TOKYO = [{"role": "user", "content": "What is the weather in Tokyo?"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
AS_JSON = [{"role": "user", "content": "Give the weather in Paris as JSON."}]
CALL = {"id": "call-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
ANSWERED = [*PARIS, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call-1",
             "content": '{"city": "Paris", "weather": "sunny"}'}]  # fmt: skip
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "weather": {"type": "string"}},
    "required": ["city", "weather"],
    "additionalProperties": False,
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHAT = "chat/completions"

CASES: list[Case] = [
    # Tool calling: auto, required, named, none, one call only, the answer after the result.
    (CHAT, {"messages": PARIS, "tools": [TOOL], "max_tokens": 60}),
    (CHAT, {"messages": TOKYO, "tools": [TOOL], "tool_choice": "auto", "max_tokens": 60}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "parallel_tool_calls": False, "max_tokens": 60}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "tool_choice": "required", "max_tokens": 60}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "tool_choice": NAMED, "max_tokens": 40}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "tool_choice": "none", "max_tokens": 60}),
    (CHAT, {"messages": ANSWERED, "tools": [TOOL], "max_tokens": 40}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "max_tokens": 60, "logprobs": True,
            "top_logprobs": 2}),
    (CHAT, {"messages": PARIS, "tools": [TOOL], "max_tokens": 12}),  # cut inside the reasoning
    # Reasoning.
    (CHAT, {"messages": FRANCE, "max_tokens": 40}),
    (CHAT, {"messages": FRANCE, "max_tokens": 40, "include_reasoning": False}),
    # Structured outputs on chat.
    (CHAT, {"messages": AS_JSON, "max_tokens": 40, "response_format": {"type": "json_object"}}),
    (CHAT, {"messages": AS_JSON, "max_tokens": 40, "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}}}),
    (CHAT, {"messages": FRANCE, "max_tokens": 20, "structured_outputs": {"regex": "[A-Z][a-z]+\\."}}),
    (CHAT, {"messages": FRANCE, "max_tokens": 20,
            "structured_outputs": {"choice": ["Paris.", "Rome.", "Berlin."]}}),
    (CHAT, {"messages": FRANCE, "max_tokens": 20,
            "structured_outputs": {"grammar": 'root ::= "Yes." | "No."'}}),
    (CHAT, {"messages": AS_JSON, "max_tokens": 40, "response_format": {"type": "text"}}),
    # Structured outputs on completions.
    ("completions", {"prompt": "the weather in paris is", "max_tokens": 8,
                     "structured_outputs": {"choice": ["sunny", "rainy"]}}),
    ("completions", {"prompt": "the weather in paris is", "max_tokens": 8,
                     "structured_outputs": {"regex": " [a-z]+"}}),
    ("completions", {"prompt": "Give the weather in Paris as JSON.", "max_tokens": 30,
                     "structured_outputs": {"json": WEATHER_SCHEMA}}),
    ("completions", {"prompt": "Give the weather in Paris as JSON.", "max_tokens": 30,
                     "response_format": {"type": "json_schema", "json_schema": {
                         "name": "weather", "schema": WEATHER_SCHEMA}}}),
    # Refused by both: a schema that does not compile, tool_choice without tools.
    (CHAT, {"messages": FRANCE, "max_tokens": 8, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        "no_stream": True}),
    (CHAT, {"messages": FRANCE, "max_tokens": 8, "tool_choice": "required", "no_stream": True}),
]  # fmt: skip


@pytest.fixture(scope="module")
def reference() -> Iterator[ServerProcess]:
    server = start_vllm_reference(model_path("tools"), *PARSERS)
    yield server
    server.stop()


def test_the_cases_cover_the_issue() -> None:
    """At least 60 requests between this module and test_vllm_conformance_e2e (which has 54)."""
    requests = sum(1 if body.get("no_stream") else 2 for _, body in CASES)
    assert requests >= 40
    text = json.dumps(CASES)
    for field in ('"tool_choice": "required"', '"tool_choice": "auto"', '"function": {"name"',
                  "json_object", "json_schema", "regex", "choice", "grammar", "include_reasoning",
                  "parallel_tool_calls"):  # fmt: skip
        assert field in text, field


def test_lmserve_on_vllm_answers_as_vllms_own_server(
    reference: ServerProcess, server_pool: Pool
) -> None:
    ours = server_pool("--model_dir", str(model_path("tools")), "--backend", "vllm",
                       "--kv-cache-memory-bytes", str(512 * 2**20), *PARSERS)  # fmt: skip
    mismatches = compare(CASES, reference, ours, 1e-3)
    assert mismatches == [], "\n".join(mismatches)


def test_lmserve_on_huggingface_answers_as_vllms_own_server(
    reference: ServerProcess, server_pool: Pool
) -> None:
    """The Hugging Face backend with xgrammar: the same text, tool calls, reasoning and
    reasons; logprobs within 2e-3."""
    ours = server_pool("--model_dir", str(model_path("tools")), "--backend", "huggingface",
                       *PARSERS)  # fmt: skip
    mismatches = compare(CASES, reference, ours, 2e-3)
    assert mismatches == [], "\n".join(mismatches)
