"""The differential conformance machinery: the same requests to vLLM's own OpenAI server and to
lmserve, compared field by field after dropping ids and timestamps (issue 17).

A non-streamed response compares its choices (text or message: content, reasoning and tool calls
by name and parsed arguments, never their random ids), finish and stop reasons, logprobs within a
tolerance, usage and prompt logprobs. A stream compares what its client reassembles: each
choice's text, reasoning and tool calls, its end, the final usage, and whether every chunk carried
the usage so far. How tokens spread over chunks is engine timing, not a field: not compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from _support.servers import ServerProcess

# (route, body): every case also runs with "stream": true unless it says "no_stream".
Case = tuple[str, dict[str, Any]]

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}

# vLLM's streaming think-tag parsers (deepseek_r1 and kin) drop a chunk that is only the start
# tag, but keep the tag in the reasoning when it shares a chunk with the next tokens: which one
# happens is the engine's output timing (an in-process engine core coalesces more often). So a
# leading start tag is dropped from the reference's streamed reasoning, never from lmserve's: a
# client of ours must never see the tag.
REASONING_START_TAG = "<think>"

_COMPLETION_CHOICE = (
    "index",
    "text",
    "finish_reason",
    "stop_reason",
    "logprobs",
    "prompt_logprobs",
)
_CHAT_CHOICE = ("index", "message", "finish_reason", "stop_reason", "logprobs")
_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")


def view(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of a non-streamed response."""
    keys = _CHAT_CHOICE if route.startswith("chat") else _COMPLETION_CHOICE
    choices = [{k: c.get(k) for k in keys} for c in body["choices"]]
    for choice in choices:
        if isinstance(choice.get("message"), dict):
            message = choice["message"]
            choice["message"] = {k: message.get(k) for k in ("role", "content", "reasoning")}
            choice["message"]["tool_calls"] = [_call(c["function"]) for c in
                                               message.get("tool_calls") or []]  # fmt: skip
    return {"choices": choices, "usage": {k: body["usage"][k] for k in _USAGE},
            "prompt_logprobs": body.get("prompt_logprobs"), "id_suffix": _id_suffix(body)}  # fmt: skip


def _id_suffix(body: dict[str, Any]) -> str | None:
    """The caller's request_id part of the response id (random ids compare as None)."""
    suffix = str(body["id"]).split("-", 1)[-1]
    return suffix if suffix.startswith("conformance") else None


def stream_view(route: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream as its client reassembles it: each choice's text, logprobs and end, the final
    usage, and whether every chunk carried the usage so far (continuous_usage_stats). How the
    tokens are spread over chunks is vLLM's engine timing, not a field: it is not compared."""
    texts: dict[int, str] = {}
    ends: dict[int, tuple[Any, Any]] = {}
    roles: dict[int, Any] = {}
    tokens: dict[int, list[Any]] = {}
    reasonings: dict[int, str] = {}
    calls: dict[int, dict[int, dict[str, str]]] = {}
    usages = []
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usages.append({k: chunk["usage"][k] for k in _USAGE})
        for c in chunk["choices"]:
            i = c["index"]
            if route.startswith("chat"):
                delta = c["delta"]
                roles.setdefault(i, delta.get("role"))
                texts[i] = texts.get(i, "") + (delta.get("content") or "")
                reasonings[i] = reasonings.get(i, "") + (delta.get("reasoning") or "")
                for piece in delta.get("tool_calls") or []:
                    call = calls.setdefault(i, {}).setdefault(piece["index"], {"arguments": ""})
                    function = piece.get("function") or {}
                    if function.get("name"):
                        call["name"] = function["name"]
                    call["arguments"] += function.get("arguments") or ""
                content = (c.get("logprobs") or {}).get("content") or []
                tokens.setdefault(i, []).extend((e["token"], e["logprob"]) for e in content)
            else:
                texts[i] = texts.get(i, "") + c["text"]
                lp = c.get("logprobs") or {}
                tokens.setdefault(i, []).extend(
                    zip(lp.get("tokens", []), lp.get("token_logprobs", []), strict=False)
                )
            if c.get("finish_reason") is not None:
                ends[i] = (c["finish_reason"], c.get("stop_reason"))
    every_chunk_has_usage = len(usages) == len(chunks)
    final_usage = usages[-1] if usages else None
    tool_calls = {i: [_call(c) for _, c in sorted(by_index.items())]
                  for i, by_index in calls.items()}  # fmt: skip
    return {"texts": texts, "ends": ends, "roles": roles, "tokens": tokens,
            "reasonings": {i: r for i, r in reasonings.items() if r}, "tool_calls": tool_calls,
            "final_usage": final_usage, "every_chunk_has_usage": every_chunk_has_usage,
            "id_suffix": _id_suffix(chunks[0]) if chunks else None}  # fmt: skip


def differences(a: Any, b: Any, tolerance: float, path: str = "") -> Iterator[str]:
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, int | float) and isinstance(b, int | float)
        if not numbers or abs(a - b) > tolerance:
            yield f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from differences(a.get(key), b.get(key), tolerance, f"{path}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from differences(x, y, tolerance, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {a!r} != {b!r}"


def ask(base: str, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, body); a stream's body is its chunks."""
    r = httpx.post(f"{base}/{route}", json=body, timeout=180)
    if r.status_code != 200:
        return r.status_code, None
    if not body.get("stream"):
        return 200, r.json()
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", r.text[-300:]
    return 200, [json.loads(line) for line in lines[:-1]]


def _call(function: dict[str, Any]) -> dict[str, Any]:
    """A tool call as compared: its name and its arguments parsed (their spacing is free)."""
    try:
        arguments = json.loads(function.get("arguments") or "null")
    except json.JSONDecodeError:
        arguments = function.get("arguments")
    return {"name": function.get("name"), "arguments": arguments}


def compare(
    cases: list[Case], reference: ServerProcess, ours: ServerProcess, tolerance: float
) -> list[str]:
    """Every case (streamed too, unless it says no_stream) to both; the mismatches."""
    compared, mismatches = 0, []
    for route, fields in cases:
        fields = dict(fields)
        streams = [False] if fields.pop("no_stream", False) else [False, True]
        for stream in streams:
            body = {"model": "model", "temperature": 0, **fields}
            if stream:
                body.update(stream=True, stream_options=STREAM_OPTIONS)
            their_status, theirs = ask(reference.url + "/v1", route, body)
            my_status, mine = ask(ours.url + "/openai/v1", route, body)
            compared += 1
            if their_status != 200 or my_status != 200:  # refused: by both, with the same code
                if their_status != my_status:
                    mismatches.append(f"{route} {body}: status {their_status} != {my_status}")
                continue
            view_of = stream_view if stream else view
            their_view = view_of(route, theirs)
            if stream:
                their_view["reasonings"] = {i: r.removeprefix(REASONING_START_TAG)
                                            for i, r in their_view["reasonings"].items()}  # fmt: skip
            diff = list(differences(their_view, view_of(route, mine), tolerance))
            if diff:
                mismatches.append(f"{route} {body}: " + "; ".join(diff[:5]))
    print(f"conformance ({' '.join(ours.args)}): {compared - len(mismatches)}/{compared} "
          "requests match vLLM's server")  # fmt: skip
    return mismatches
