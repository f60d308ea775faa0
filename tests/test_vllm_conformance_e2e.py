"""Differential conformance: the same requests to vLLM's own OpenAI server and to
``lmserve serve --backend vllm`` on the same tiny model, compared field by field after dropping
ids and timestamps (text, token counts, finish and stop reasons, logprobs within 1e-3).

vLLM 0.32's server is the reference for every field and response shape (issue 17). The module
prints the match rate; every request must match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from _support.servers import ServerProcess
from _support.tiny_models import model_path
from _support.vllm_reference import start_vllm_reference

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

PROMPT = "the capital of france is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONTINUE = [*FRANCE, {"role": "assistant", "content": "Par"}]
TOLERANCE = 1e-3

# (route, body): every case also runs with "stream": true unless it says "no_stream".
Case = tuple[str, dict[str, Any]]
CASES: list[Case] = [
    ("completions", {"prompt": PROMPT, "max_tokens": 12}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "min_tokens": 6}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "stop": ["."]}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "stop": ["."],
                     "include_stop_str_in_output": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "stop_token_ids": [16]}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "logprobs": 3}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 2}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "prompt_logprobs": 2, "no_stream": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "truncate_prompt_tokens": 3,
                     "truncation_side": "left"}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "truncate_prompt_tokens": 3}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "n": 2}),  # greedy n > 1: refused
    ("completions", {"prompt": [PROMPT, "the capital of italy is"], "max_tokens": 6}),
    ("completions", {"prompt": [262, 270, 269, 321, 272], "max_tokens": 6}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "logprobs": 1,
                     "return_tokens_as_token_ids": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True,
                     "skip_special_tokens": False}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "request_id": "conformance-1"}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "logprobs": True,
                          "top_logprobs": 2}),
    ("chat/completions", {"messages": FRANCE, "max_completion_tokens": 2}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "min_tokens": 5}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "stop": ["is"],
                          "include_stop_str_in_output": True}),
    ("chat/completions", {"messages": CONTINUE, "max_tokens": 6, "add_generation_prompt": False,
                          "continue_final_message": True, "echo": True}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "prompt_logprobs": 1,
                          "no_stream": True}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "n": 2}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 8, "ignore_eos": True,
                          "skip_special_tokens": False}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "request_id": "conformance-2"}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "logprobs": True,
                          "return_tokens_as_token_ids": True}),
]  # fmt: skip
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}

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


def _view(route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of a non-streamed response."""
    keys = _CHAT_CHOICE if route.startswith("chat") else _COMPLETION_CHOICE
    choices = [{k: c.get(k) for k in keys} for c in body["choices"]]
    for choice in choices:
        if isinstance(choice.get("message"), dict):
            choice["message"] = {k: choice["message"].get(k) for k in ("role", "content")}
    return {"choices": choices, "usage": {k: body["usage"][k] for k in _USAGE},
            "prompt_logprobs": body.get("prompt_logprobs"), "id_suffix": _id_suffix(body)}  # fmt: skip


def _id_suffix(body: dict[str, Any]) -> str | None:
    """The caller's request_id part of the response id (random ids compare as None)."""
    suffix = str(body["id"]).split("-", 1)[-1]
    return suffix if suffix.startswith("conformance") else None


def _stream_view(route: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream as its client reassembles it: each choice's text, logprobs and end, the final
    usage, and whether every chunk carried the usage so far (continuous_usage_stats). How the
    tokens are spread over chunks is vLLM's engine timing, not a field: it is not compared."""
    texts: dict[int, str] = {}
    ends: dict[int, tuple[Any, Any]] = {}
    roles: dict[int, Any] = {}
    tokens: dict[int, list[Any]] = {}
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
    return {"texts": texts, "ends": ends, "roles": roles, "tokens": tokens,
            "final_usage": final_usage, "every_chunk_has_usage": every_chunk_has_usage,
            "id_suffix": _id_suffix(chunks[0]) if chunks else None}  # fmt: skip


def _differences(a: Any, b: Any, tolerance: float, path: str = "") -> Iterator[str]:
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, int | float) and isinstance(b, int | float)
        if not numbers or abs(a - b) > tolerance:
            yield f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            yield from _differences(a.get(key), b.get(key), tolerance, f"{path}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from _differences(x, y, tolerance, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {a!r} != {b!r}"


def _ask(base: str, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, body); a stream's body is its chunks."""
    r = httpx.post(f"{base}/{route}", json=body, timeout=180)
    if r.status_code != 200:
        return r.status_code, None
    if not body.get("stream"):
        return 200, r.json()
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", r.text[-300:]
    return 200, [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def reference() -> Iterator[ServerProcess]:
    server = start_vllm_reference(model_path("llama"))
    yield server
    server.stop()


def _compare(reference: ServerProcess, ours: ServerProcess, tolerance: float) -> list[str]:
    """Every case (streamed too, unless it says no_stream) to both; the mismatches."""
    compared, mismatches = 0, []
    for route, fields in CASES:
        fields = dict(fields)
        streams = [False] if fields.pop("no_stream", False) else [False, True]
        for stream in streams:
            body = {"model": "model", "temperature": 0, **fields}
            if stream:
                body.update(stream=True, stream_options=STREAM_OPTIONS)
            their_status, theirs = _ask(reference.url + "/v1", route, body)
            my_status, mine = _ask(ours.url + "/openai/v1", route, body)
            compared += 1
            if their_status != 200 or my_status != 200:  # refused: by both, with the same code
                if their_status != my_status:
                    mismatches.append(f"{route} {body}: status {their_status} != {my_status}")
                continue
            view = _stream_view if stream else _view
            diff = list(_differences(view(route, theirs), view(route, mine), tolerance))
            if diff:
                mismatches.append(f"{route} {body}: " + "; ".join(diff[:5]))
    print(f"conformance ({' '.join(ours.args)}): {compared - len(mismatches)}/{compared} "
          "requests match vLLM's server")  # fmt: skip
    return mismatches


def test_lmserve_on_vllm_answers_as_vllms_own_server(
    reference: ServerProcess, server_pool: Pool
) -> None:
    ours = server_pool("--model_dir", str(model_path("llama")), "--backend", "vllm",
                       "--kv-cache-memory-bytes", str(512 * 2**20))  # fmt: skip
    mismatches = _compare(reference, ours, TOLERANCE)
    assert mismatches == [], "\n".join(mismatches)


def test_lmserve_on_huggingface_answers_as_vllms_own_server(
    reference: ServerProcess, server_pool: Pool
) -> None:
    """The same requests on the Hugging Face backend: the same text, token counts, reasons and
    shapes; logprobs within 2e-3 (another kernel, the same float32 weights)."""
    ours = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    mismatches = _compare(reference, ours, 2e-3)
    assert mismatches == [], "\n".join(mismatches)
