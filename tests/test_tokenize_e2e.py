"""vLLM's ``/tokenize`` and ``/detokenize`` on real servers (docs/behaviour.md §5, "Tokenize"):
the prompt and chat forms on the tiny llama (Hugging Face backend), an encoder model, bad input,
no admission slot taken, and the same requests against vLLM's own server and
``lmserve serve --backend vllm``: identical tokens, counts, token strings and text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

PROMPT = "the capital of france is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONTINUE = [*FRANCE, {"role": "assistant", "content": "Par"}]
PATHS = ("/tokenize", "/openai/v1/tokenize")
KV = ("--kv-cache-memory-bytes", str(512 * 2**20))


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def ok(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


@pytest.fixture(scope="module")
def llama(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")


@pytest.fixture(scope="module")
def sentiment(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("sentiment")))


# --- the prompt form --------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_prompt_form_has_vllms_shape(llama: ServerProcess, path: str) -> None:
    out = ok(llama, path, {"prompt": PROMPT})
    # vLLM sends every key, token_strs as null when not asked for.
    assert list(out) == ["count", "max_model_len", "tokens", "token_strs"]
    assert out["token_strs"] is None
    assert out["count"] == len(out["tokens"]) == 5
    cards = httpx.get(llama.url + "/openai/v1/models").json()["data"]
    assert out["max_model_len"] == cards[0]["max_model_len"] == 256
    # The ids a completion of the same prompt is charged for.
    done = ok(llama, "/openai/v1/completions",
              {"model": "model", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert done["usage"]["prompt_tokens"] == out["count"]
    # With the served name: the same.
    assert ok(llama, path, {"model": "model", "prompt": PROMPT}) == out


def test_token_strs_spell_the_prompt(llama: ServerProcess) -> None:
    out = ok(llama, "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    strs = out["token_strs"]
    assert len(strs) == out["count"]
    # Byte-level BPE: "Ġ" is the space byte.
    assert "".join(strs).replace("Ġ", " ") == PROMPT


def test_detokenize_round_trips(llama: ServerProcess) -> None:
    for text in (PROMPT, "héllo wörld ✓ 東京", "<|im_start|>user\nhi<|im_end|>"):
        tokens = ok(llama, "/tokenize", {"prompt": text})["tokens"]
        for path in ("/detokenize", "/openai/v1/detokenize"):
            assert ok(llama, path, {"tokens": tokens}) == {"prompt": text}
    # Special tokens are kept (vLLM's detokenize does not skip them).
    assert ok(llama, "/detokenize", {"tokens": [1, 2]}) == {"prompt": "<|im_start|><|im_end|>"}
    # Nothing to decode is nothing (as vLLM).
    assert ok(llama, "/detokenize", {"tokens": []}) == {"prompt": ""}


def test_a_long_prompt_is_counted_not_refused(llama: ServerProcess) -> None:
    # Longer than the context and than what is tokenized on the event loop.
    text = "once upon a time " * 400
    out = ok(llama, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert out["count"] > out["max_model_len"] and len(out["token_strs"]) == out["count"]
    assert ok(llama, "/detokenize", {"tokens": out["tokens"]}) == {"prompt": text}


# --- the chat form ----------------------------------------------------------------------


def test_chat_form_is_the_chat_completions_prompt(llama: ServerProcess) -> None:
    out = ok(llama, "/tokenize", {"messages": FRANCE, "return_token_strs": True})
    text = ok(llama, "/detokenize", {"tokens": out["tokens"]})["prompt"]
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["token_strs"][:2] == ["<|im_start|>", "user"]
    done = ok(llama, "/openai/v1/chat/completions",
              {"model": "model", "messages": FRANCE, "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert done["usage"]["prompt_tokens"] == out["count"]
    # The generation prompt is the last three tokens: "<|im_start|>", "assistant", "\n".
    bare = ok(llama, "/openai/v1/tokenize", {"messages": FRANCE, "add_generation_prompt": False})
    assert bare["tokens"] == out["tokens"][:-3]
    # The template writes what it wants; add_special_tokens adds no BOS to this model.
    special = ok(llama, "/tokenize", {"messages": FRANCE, "add_special_tokens": True})
    assert special["tokens"] == out["tokens"]


def test_chat_form_continues_the_final_message(llama: ServerProcess) -> None:
    body = {"messages": CONTINUE, "add_generation_prompt": False, "continue_final_message": True}
    out = ok(llama, "/tokenize", body)
    assert ok(llama, "/detokenize", {"tokens": out["tokens"]})["prompt"].endswith(
        "<|im_start|>assistant\nPar"
    )
    done = ok(llama, "/openai/v1/chat/completions",
              {"model": "model", **body, "max_tokens": 1, "temperature": 0})  # fmt: skip
    assert done["usage"]["prompt_tokens"] == out["count"]


@pytest.fixture(scope="module")
def trusted(server_pool: Pool) -> ServerProcess:
    """The llama with --trust_request_chat_template."""
    return server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface",
                       "--trust_request_chat_template")  # fmt: skip


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TOOL_TEMPLATE = (
    "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_trusted_request_template_and_tools(trusted: ServerProcess) -> None:
    body = {"messages": FRANCE, "chat_template": TOOL_TEMPLATE, "tools": [TOOL]}
    out = ok(trusted, "/tokenize", body)
    text = ok(trusted, "/detokenize", {"tokens": out["tokens"]})["prompt"]
    assert text.startswith("[get_weather]<|im_start|>user\nWhat is the capital")
    # Chat completions render the tools too (tool_choice "none": no parser on this server).
    done = ok(trusted, "/openai/v1/chat/completions", {"model": "model", **body, "max_tokens": 1,
              "temperature": 0, "tool_choice": "none"})  # fmt: skip
    assert done["usage"]["prompt_tokens"] == out["count"]
    # chat_template_kwargs reach the template as chat completions pass them.
    kwargs = {"messages": FRANCE, "chat_template": "{{ greeting }}",
              "chat_template_kwargs": {"greeting": "hello world"}}  # fmt: skip
    tokens = ok(trusted, "/tokenize", kwargs)["tokens"]
    assert ok(trusted, "/detokenize", {"tokens": tokens}) == {"prompt": "hello world"}


def _gauges(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    names = ("lmserve_requests_in_flight", "lmserve_admitted_requests")
    found = {n: re.findall(rf"^{n}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M) for n in names}
    return {n: sum(float(v) for v in values) for n, values in found.items()}


def test_a_long_tokenize_blocks_neither_the_server_nor_a_slot(llama: ServerProcess) -> None:
    text = "once upon a time there was a fox. " * 50_000  # ~1.7 MB: a second or more
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, llama, "/tokenize", {"prompt": text})
        busy = []
        while not running.done():
            gauges = _gauges(llama)  # answered while the long one is tokenized
            if gauges["lmserve_requests_in_flight"] >= 1:
                busy.append(gauges["lmserve_admitted_requests"])
        r = running.result()
    assert r.status_code == 200 and r.json()["count"] == 500_000
    # Several scrapes answered mid-request (a blocked event loop answers none), and the
    # tokenize never held an admission slot.
    assert len(busy) >= 3 and set(busy) == {0}, busy


# --- encoders ---------------------------------------------------------------------------


def test_encoder_prompt_form(sentiment: ServerProcess) -> None:
    out = ok(sentiment, "/tokenize", {"prompt": "I love this", "return_token_strs": True})
    assert out["token_strs"] == ["[CLS]", "i", "love", "this", "[SEP]"]
    meta = httpx.get(sentiment.url + "/v2/models/model").json()
    assert out["max_model_len"] == meta["parameters"]["max_length"] == 64
    plain = ok(sentiment, "/tokenize", {"prompt": "I love this", "add_special_tokens": False})
    assert plain["tokens"] == out["tokens"][1:-1] and plain["count"] == 3
    assert ok(sentiment, "/detokenize", {"tokens": out["tokens"]}) == {
        "prompt": "[CLS] i love this [SEP]"
    }
    # Longer than the model takes: counted whole (the model would truncate it).
    assert ok(sentiment, "/tokenize", {"prompt": "i love this " * 40})["count"] == 122


def test_encoder_chat_form_is_400(sentiment: ServerProcess) -> None:
    err = openai_error(post(sentiment, "/tokenize", {"messages": FRANCE}), 400)
    assert err["param"] == "messages" and "chat template" in err["message"]


# --- bad input --------------------------------------------------------------------------


BAD: list[tuple[str, dict[str, Any], int, str]] = [
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [10**9]}, 400, "out of vocabulary"),
    ("/detokenize", {"tokens": [2**64]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/tokenize", {"prompt": PROMPT, "model": "nope"}, 404, "nope"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "nope"),
    ("/tokenize", {"messages": FRANCE, "mm_processor_kwargs": {"x": 1}}, 400,
     "mm_processor_kwargs"),
    ("/tokenize", {"messages": FRANCE, "media_io_kwargs": {"image": {}}}, 400,
     "media_io_kwargs"),
    ("/tokenize", {"messages": FRANCE, "chat_template": "{{ 'x' }}"}, 400,
     "trust_request_chat_template"),
    ("/tokenize", {"messages": FRANCE, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,needle", BAD)
@pytest.mark.parametrize("prefix", ["", "/openai/v1"])
def test_bad_input_is_an_openai_error(
    llama: ServerProcess, prefix: str, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    err = openai_error(post(llama, prefix + path, body), status)
    assert needle in err["message"] + str(err["param"])


def test_text_no_tokenizer_can_encode_is_400(llama: ServerProcess) -> None:
    # A lone surrogate is valid JSON but no text: refused with the body, not a 500.
    for raw in (
        b'{"prompt": "a\\ud800"}',
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    ):
        r = httpx.post(llama.url + "/tokenize", content=raw, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert "surrogate" in openai_error(r, 400)["message"] or "escape" in r.text


def test_unset_refused_fields_are_accepted(llama: ServerProcess) -> None:
    # vLLM's defaults (and fields of no API at all) are no reason to refuse.
    body = {"messages": FRANCE, "mm_processor_kwargs": None, "media_io_kwargs": None, "x": 1}
    assert ok(llama, "/tokenize", body) == ok(llama, "/tokenize", {"messages": FRANCE})


# --- conformance: vLLM's own server ---------------------------------------------------------

CASES: list[tuple[str, dict[str, Any]]] = [
    ("/tokenize", {"prompt": PROMPT}),
    ("/tokenize", {"prompt": PROMPT, "return_token_strs": True}),
    ("/tokenize", {"prompt": PROMPT, "add_special_tokens": False}),
    ("/tokenize", {"prompt": "héllo wörld ✓ 東京\n\ttabs", "return_token_strs": True}),
    ("/tokenize", {"prompt": ""}),
    ("/tokenize", {"prompt": "once upon a time " * 100}),
    ("/tokenize", {"messages": FRANCE}),
    ("/tokenize", {"messages": FRANCE, "return_token_strs": True}),
    ("/tokenize", {"messages": FRANCE, "add_generation_prompt": False}),
    ("/tokenize", {"messages": FRANCE, "add_special_tokens": True}),
    ("/tokenize", {"messages": CONTINUE, "add_generation_prompt": False,
                   "continue_final_message": True, "return_token_strs": True}),
    ("/tokenize", {"messages": [{"role": "system", "content": "Be brief."}, *FRANCE,
                                {"role": "assistant", "content": "Paris."},
                                {"role": "user", "content": "And Germany?"}]}),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]}]}),
    ("/detokenize", {"tokens": [262, 270, 269, 321, 272]}),
    ("/detokenize", {"tokens": [0, 1, 2, 201, 262]}),
    ("/detokenize", {"tokens": []}),
]  # fmt: skip


BACKENDS = {"huggingface": ("--backend", "huggingface"), "vllm": ("--backend", "vllm", *KV)}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_answers_as_vllms_own_server(
    llama_reference: ServerProcess, server_pool: Pool, backend: str
) -> None:
    ours = server_pool("--model_dir", str(model_path("llama")), *BACKENDS[backend])
    mismatches = []
    for path, body in CASES:
        theirs = ok(llama_reference, path, body)
        for prefix in ("", "/openai/v1"):
            mine = ok(ours, prefix + path, body)
            if mine != theirs:
                mismatches.append(
                    f"{prefix}{path} {json.dumps(body)[:100]}:\n  vLLM   {theirs}\n  lmserve {mine}"
                )
    assert mismatches == [], "\n".join(mismatches)
