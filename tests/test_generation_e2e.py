"""OpenAI completions and chat on the Hugging Face backend, through the official SDK (docs/behaviour.md §5)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from _support.sdk import openai_client
from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(server_pool: Pool) -> ServerProcess:
    # No model flag: the built-in SmolLM2 is the default (here on the HF backend;
    # tests/test_vllm_e2e.py covers the same on vLLM, the auto default).
    return server_pool("--backend", "huggingface")


def client(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server, timeout=120)


def metric(server: ServerProcess, name: str) -> float:
    """``name``'s value summed over its label sets (the served ``model``, ...); 0 when absent."""
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return sum(float(v) for v in found)


# --- answers ----------------------------------------------------------------------------


def test_default_model_answers_paris_in_chat(smol: ServerProcess) -> None:
    c = client(smol)
    assert [m.id for m in c.models.list().data] == ["model"]
    r = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_equals_non_streaming(smol: ServerProcess) -> None:
    c = client(smol)
    full = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30)
    chunks = list(c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content and "Paris" in text
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in with_choices[1:])
    assert [ch.choices[0].finish_reason for ch in with_choices][-1] == "stop"
    assert all(ch.choices[0].finish_reason is None for ch in with_choices[:-1])
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )


def test_completions_stream_and_length(smol: ServerProcess) -> None:
    c = client(smol)
    full = c.completions.create(
        model="model", prompt="The capital of France is", temperature=0, max_tokens=12
    )
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    streamed = "".join(
        ch.choices[0].text for ch in c.completions.create(
            model="model", prompt="The capital of France is", temperature=0, max_tokens=12, stream=True)
        if ch.choices
    )  # fmt: skip
    assert streamed == full.choices[0].text and "Paris" in streamed


def test_seed_reproducible_and_different(smol: ServerProcess) -> None:
    c = client(smol)

    def sample(seed: int) -> str:
        r = c.completions.create(
            model="model", prompt="Once upon a time", temperature=1.0, seed=seed, max_tokens=24
        )
        return r.choices[0].text

    a, b, other = sample(7), sample(7), sample(8)
    assert a == b
    assert a != other
    # n > 1 with a seed: choices differ from each other, and the set is reproducible.
    r1 = c.completions.create(
        model="model", prompt="Once upon a time", temperature=1.0, seed=3, max_tokens=16, n=3
    )
    r2 = c.completions.create(
        model="model", prompt="Once upon a time", temperature=1.0, seed=3, max_tokens=16, n=3
    )
    texts = [ch.text for ch in r1.choices]
    assert texts == [ch.text for ch in r2.choices] and len(set(texts)) > 1
    assert [ch.index for ch in r1.choices] == [0, 1, 2]


def test_stop_strings_and_logit_bias(smol: ServerProcess) -> None:
    c = client(smol)
    r = c.chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=30, stop=[" Paris"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" not in r.choices[0].message.content and r.choices[0].message.content.endswith(
        "is"
    )
    # Banning every token that spells " Paris" at the start changes the answer.
    tok_ids = c.completions.create(
        model="model", prompt="x", max_tokens=1, temperature=0, logprobs=0
    )  # warm
    assert tok_ids.choices
    paris = smol_token_ids(" Paris")
    banned = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30,
                                       logit_bias={str(t): -100 for t in paris})  # fmt: skip
    assert "Paris" not in banned.choices[0].message.content


def smol_token_ids(text: str) -> list[int]:
    from transformers import AutoTokenizer

    from lmserve_core.model_files import resolve_model_source

    tok = AutoTokenizer.from_pretrained(
        resolve_model_source(model_id="smollm2-135m-instruct", model_dir=None).path
    )
    return list(tok.encode(text, add_special_tokens=False))


def test_logprobs_chat_and_completions(smol: ServerProcess) -> None:
    c = client(smol)
    r = c.chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert (
        len(content) == r.usage.completion_tokens or len(content) == r.usage.completion_tokens - 1
    )
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    comp = c.completions.create(model="model", prompt="The capital of France is", temperature=0, max_tokens=4,
                                logprobs=2, echo=True)  # fmt: skip
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text.startswith("The capital of France is")
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.text_offset)
        == comp.usage.prompt_tokens + 4
    )
    assert lp.text_offset == sorted(lp.text_offset)


def test_concurrent_requests_share_forward_passes(smol: ServerProcess) -> None:
    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(
            base_url=smol.url + "/openai/v1", api_key="unused", max_retries=0, timeout=120
        )
        calls = [ac.completions.create(model="model", prompt=f"Count to {i}:", temperature=0, max_tokens=24)
                 for i in range(8)]  # fmt: skip
        results = await asyncio.gather(*calls)
        await ac.close()
        return [r.choices[0].text for r in results]

    texts = asyncio.run(run())
    assert len(texts) == 8 and all(texts)
    # The decode batch histogram saw passes with more than one sequence.
    metrics = httpx.get(smol.url + "/metrics").text
    single = float(
        re.search(r'lmserve_decode_batch_size_bucket\{le="1.0"\} ([0-9.e+]+)', metrics).group(1)
    )
    total = float(re.search(r"lmserve_decode_batch_size_count ([0-9.e+]+)", metrics).group(1))
    assert total > single, "no decoding step ever batched more than one sequence"
    # Batched outputs equal the same requests run alone (greedy).
    alone = client(smol).completions.create(
        model="model", prompt="Count to 3:", temperature=0, max_tokens=24
    )
    assert alone.choices[0].text == texts[3]


def test_disconnect_aborts_generation(smol: ServerProcess) -> None:
    body = {"model": "model", "prompt": "Tell me a very long story.", "max_tokens": 3000, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=smol.url, timeout=60) as h,
        h.stream("POST", "/openai/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    # The client is gone; within a few steps no more decoding happens.
    time.sleep(1.0)
    before = metric(smol, "lmserve_decode_batch_size_count")
    time.sleep(1.5)
    after = metric(smol, "lmserve_decode_batch_size_count")
    assert after == before, f"decoding continued after the client left ({before} -> {after})"
    r = client(smol).chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=20
    )
    assert "Paris" in r.choices[0].message.content


def test_a_client_that_leaves_is_499_not_503(smol: ServerProcess) -> None:
    body = {"model": "model", "prompt": "Tell me a very long story.", "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    route = 'route="/openai/v1/completions"'
    with pytest.raises(httpx.TimeoutException):  # the client gives up mid-generation
        httpx.post(smol.url + "/openai/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 20
    while True:
        page = httpx.get(smol.url + "/metrics", timeout=10).text
        left = re.search(
            rf'^lmserve_requests_total\{{[^}}]*{route}[^}}]*status="499"\}} ', page, re.M
        )
        if left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left, "the abandoned request was not counted as 499"
    assert not re.search(rf'^lmserve_requests_total\{{[^}}]*{route}[^}}]*status="503"', page, re.M)
    assert re.search(r"POST /openai/v1/completions 499", smol.log())


# --- bad input --------------------------------------------------------------------------

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "text",
    ),
    ({"messages": FRANCE, "max_tokens": -1}, "max_tokens"),
    ({"messages": FRANCE, "max_tokens": 10**9}, "context length"),
    ({"messages": FRANCE, "temperature": 7}, "temperature"),
    ({"messages": FRANCE, "n": 10**6}, "n"),
    ({"messages": FRANCE, "top_logprobs": 5}, "logprobs"),
    ({"messages": FRANCE, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": FRANCE, "chat_template": "{{ 'x' }}"}, "trust_request_chat_template"),
    ({"messages": FRANCE, "stream_options": {"include_usage": True}}, "stream"),
]


@pytest.mark.parametrize("extra,needle", BAD_CHAT)
def test_bad_chat_requests_are_400(
    smol: ServerProcess, extra: dict[str, object], needle: str
) -> None:
    r = httpx.post(
        smol.url + "/openai/v1/chat/completions", json={"model": "model", **extra}, timeout=60
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in (
        err["message"] + str(err["param"])
    )


def test_sdk_sees_404_and_400(smol: ServerProcess) -> None:
    c = client(smol)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="model", prompt="x", max_tokens=100_000)
    assert "maximum context length" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="model", prompt=[], max_tokens=1)


# --- tiny trained models: decoder-only without a template, encoder-decoder ------------------


def test_tiny_llama_chat_and_completion(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    c = client(server)
    r = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=10)
    assert r.choices[0].message.content.startswith("Paris") and r.choices[0].finish_reason == "stop"
    r = c.completions.create(
        model="model", prompt="the capital of france is", temperature=0, max_tokens=2
    )
    assert r.choices[0].text.startswith(" paris")


def test_model_without_chat_template_is_400(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("gpt2")), "--backend", "huggingface")
    r = httpx.post(
        server.url + "/openai/v1/chat/completions", json={"model": "model", "messages": FRANCE}
    )
    assert r.status_code == 400 and "--chat_template" in r.json()["error"]["message"]
    out = client(server).completions.create(
        model="model", prompt="the capital of france is", temperature=0, max_tokens=2
    )
    assert out.choices[0].text.startswith(" paris")


def test_t5_text2text(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("t5")))
    c = client(server)
    outs = c.completions.create(model="model", prompt=["capital of france:", "capital of germany:"],
                                temperature=0, max_tokens=8)  # fmt: skip
    assert [ch.text for ch in outs.choices] == ["paris", "berlin"]
    assert all(ch.finish_reason == "stop" for ch in outs.choices)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="model", prompt="capital of italy:", temperature=0, max_tokens=8, stream=True) if ch.choices)  # fmt: skip
    assert streamed == "rome"
    meta = httpx.get(server.url + "/v2/models/model").json()
    assert meta["parameters"]["task"] == "text2text_generation"
