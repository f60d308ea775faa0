"""Tool calling, structured outputs and reasoning through real clients, on both backends
(issue 17): the official ``openai`` SDK (tools, its stream helpers, ``parse``) and a LangChain
``bind_tools`` agent loop, against a tiny model trained to call a weather tool in hermes format
and to think in ``<think>`` (``tiny_models`` "tools"), served with vLLM's ``hermes`` tool parser
and ``deepseek_r1`` reasoning parser, as a KServe manifest would start ``vllm serve``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import pydantic
import pytest

from _support.sdk import openai_client
from _support.servers import ServerProcess
from _support.tiny_model_checks import WEATHER_TOOL
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

PARSERS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           "--reasoning-parser", "deepseek_r1")  # fmt: skip
BACKENDS = {
    "vllm": ("--backend", "vllm", "--kv-cache-memory-bytes", str(512 * 2**20)),
    "huggingface": ("--backend", "huggingface"),
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def server(request: pytest.FixtureRequest, server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("tools")), *BACKENDS[request.param],
                       *PARSERS)  # fmt: skip


def client(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server, timeout=180)


def test_auto_tool_call_with_reasoning(server: ServerProcess) -> None:
    r = client(server).chat.completions.create(
        model="model", messages=ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # vLLM 0.32's field for the parsed reasoning; the content holds neither it nor the call.
    assert (choice.message.model_extra or {})["reasoning"].strip() == (
        "The user wants the weather in Paris."
    )
    assert not (choice.message.content or "").strip()


def test_streamed_tool_call_through_the_sdk_stream_helper(server: ServerProcess) -> None:
    with client(server).chat.completions.stream(
        model="model", messages=ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=80
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_raw_stream_sends_id_and_name_first_then_arguments(server: ServerProcess) -> None:
    body = {"model": "model", "messages": ASK, "tools": [WEATHER_TOOL], "temperature": 0,
            "max_tokens": 80, "stream": True}  # fmt: skip
    r = httpx.post(server.url + "/openai/v1/chat/completions", json=body, timeout=180)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    pieces = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert pieces and pieces[0]["index"] == 0
    assert pieces[0]["id"].startswith("chatcmpl-tool-") and pieces[0]["type"] == "function"
    assert pieces[0]["function"]["name"] == "get_weather"
    assert all("id" not in p for p in pieces[1:])  # the id only in the call's first piece
    arguments = "".join(p.get("function", {}).get("arguments") or "" for p in pieces)
    assert json.loads(arguments) == {"city": "Paris"}
    reasoning = "".join(ch["delta"].get("reasoning") or "" for c in chunks for ch in c["choices"])
    assert reasoning.strip() == "The user wants the weather in Paris."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_tool_result_goes_back_and_the_model_answers(server: ServerProcess) -> None:
    call = {"id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call-1",
                "content": '{"city": "Paris", "weather": "sunny"}'}]  # fmt: skip
    r = client(server).chat.completions.create(
        model="model", messages=history, tools=[WEATHER_TOOL], temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content is not None
    assert choice.message.content.strip() == "It is sunny in Paris."


def test_required_and_named_tool_choice_hold_the_output_to_the_schema(
    server: ServerProcess,
) -> None:
    """vLLM's hermes parser holds the call envelope to a structural tag; a ``strict`` tool's
    arguments to its schema too (vLLM's --tool-strict-level auto)."""
    sdk = client(server)
    strict = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}
    required = sdk.chat.completions.create(
        model="model", messages=ASK, tools=[strict], tool_choice="required",
        temperature=0, max_tokens=80,
    )  # fmt: skip
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.function.name == "get_weather" for c in calls)
    assert all(isinstance(json.loads(c.function.arguments)["city"], str) for c in calls)
    named = sdk.chat.completions.create(
        model="model", messages=ASK, tools=[strict], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    choice = named.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's (and vLLM's) for a named function
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


class Weather(pydantic.BaseModel):
    city: str
    weather: str


def test_sdk_parse_returns_the_pydantic_object(server: ServerProcess, server_pool: Pool) -> None:
    """Without a reasoning parser: the model answers this one with JSON and no <think>, which
    deepseek_r1 (as in vLLM) would take for reasoning and leave no content to parse."""
    backend = BACKENDS["vllm" if "vllm" in server.args else "huggingface"]
    plain = server_pool("--model_dir", str(model_path("tools")), *backend)
    r = client(plain).chat.completions.parse(
        model="model", temperature=0, max_tokens=60, response_format=Weather,
        messages=[{"role": "user", "content": "Give the weather in Paris as JSON."}],
    )  # fmt: skip
    parsed = r.choices[0].message.parsed
    assert parsed == Weather(city="Paris", weather="sunny")


def test_langchain_agent_calls_the_tool_and_answers(server: ServerProcess) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city"""
        calls.append(city)
        return json.dumps({"city": city, "weather": "sunny"})

    llm = ChatOpenAI(base_url=server.url + "/openai/v1", api_key="unused", model="model",
                     temperature=0, max_tokens=80, max_retries=0)  # fmt: skip
    # The OpenAI definition itself: the tiny model knows its tools block as the SDK sends it
    # (LangChain's own schema from the signature orders the keys differently).
    agent = llm.bind_tools([WEATHER_TOOL])
    messages: list = [HumanMessage("What is the weather in Paris?")]
    for _ in range(3):  # the agent loop: call tools until the model answers
        reply = agent.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            result = get_weather.invoke(call["args"])
            messages.append(ToolMessage(result, tool_call_id=call["id"]))
    assert calls == ["Paris"]
    assert str(messages[-1].content).strip() == "It is sunny in Paris."


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
         "tools.0.function.name"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "{}"}]},
         "messages[1].tool_call_id"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                   "function": {"name": "other"}}},
         "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tools_and_constraints_are_400_naming_the_field(
    server: ServerProcess, body: dict[str, object], param: str
) -> None:
    full = {"model": "model", "messages": ASK, "max_tokens": 8, **body}
    r = httpx.post(server.url + "/openai/v1/chat/completions", json=full, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    ok = httpx.post(server.url + "/openai/v1/chat/completions", timeout=60,
                    json={"model": "model", "messages": ASK, "max_tokens": 4})  # fmt: skip
    assert ok.status_code == 200


def test_compact_json_is_honoured_or_refused_never_ignored(
    server: ServerProcess, server_pool: Pool
) -> None:
    """disable_any_whitespace: the Hugging Face backend (xgrammar per request) gives compact
    JSON; vLLM 0.32's engine reads it only from its server-wide config, so a request's is a 400
    there rather than accepted and ignored (as vLLM's own server does)."""
    on_vllm = "vllm" in server.args
    plain = server_pool("--model_dir", str(model_path("tools")),
                        *BACKENDS["vllm" if on_vllm else "huggingface"])  # fmt: skip
    schema = {"type": "object", "properties": {"city": {"type": "string"},
              "weather": {"type": "string"}}, "required": ["city", "weather"]}  # fmt: skip
    body = {"model": "model", "prompt": "Give the weather in Paris as JSON.", "max_tokens": 40,
            "temperature": 0,
            "structured_outputs": {"json": schema, "disable_any_whitespace": True}}  # fmt: skip
    r = httpx.post(plain.url + "/openai/v1/completions", json=body, timeout=120)
    if on_vllm:
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
        assert "disable_any_whitespace" in r.json()["error"]["message"]
        return
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert json.loads(text).keys() == {"city", "weather"}
    assert not any(
        c.isspace()
        for c in text.replace(json.loads(text)["city"], "").replace(json.loads(text)["weather"], "")
    )  # no whitespace outside the values
