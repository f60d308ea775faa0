"""Overload, abandoned streams, graceful shutdown and API keys against real servers (docs/behaviour.md §8).

Real models (tiny Llama and the built-in SmolLM2 on the Hugging Face backend, a tiny embedding
BERT), real clients (the openai SDK, tritonclient over HTTP and gRPC, raw httpx streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _support.reliability import abandon_many, assert_idle, metric
from _support.sdk import openai_client
from _support.servers import ServerProcess, free_port, start_server
from _support.tiny_models import model_path
from lmserve_protocols.grpc import grpc_predict_v2_pb2 as pb
from lmserve_protocols.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]


# --- overload ----------------------------------------------------------------------------


def test_a_flood_gets_429_with_retry_after_and_the_rest_complete(server_pool: Pool) -> None:
    # 2 sequences run, 2 more may wait: a burst of 16 streams must see 429s, not a queue.
    server = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface",
                         "--max_num_seqs", "2", "--max_queued_requests", "2")  # fmt: skip
    client = openai.AsyncOpenAI(base_url=server.url + "/openai/v1", api_key="x", max_retries=0)

    async def one() -> str:
        try:
            stream = await client.completions.create(model="model", prompt="Once", stream=True,
                                                     extra_body={"ignore_eos": True}, max_tokens=60)  # fmt: skip
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            return "ok" if text else "empty"
        except openai.RateLimitError as exc:
            retry_after = int(exc.response.headers["retry-after"])
            assert retry_after >= 1
            assert "--max_queued_requests" in exc.message
            return "429"

    async def flood() -> list[str]:
        async with client:
            return await asyncio.gather(*(one() for _ in range(16)))

    outcomes = asyncio.run(flood())
    assert outcomes.count("ok") >= 4 and outcomes.count("429") >= 1, outcomes
    assert set(outcomes) <= {"ok", "429"}, outcomes
    assert metric(server, "lmserve_rejected_requests_total") >= outcomes.count("429")
    assert_idle(server)
    # n counts as n sequences: n=5 can never fit 2 + 2 while anything else runs, but alone it runs.
    r = openai_client(server).completions.create(model="model", prompt="Once", n=5, max_tokens=4)
    assert len(r.choices) == 5


# --- cancellation ------------------------------------------------------------------------


def test_hundreds_of_abandoned_streams_leave_nothing_behind(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    abandon_many(server, count=300, concurrency=24)
    assert_idle(server)
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    # And the engine still generates, deterministically.
    c = openai_client(server)
    kwargs = {"model": "model", "prompt": "Once", "max_tokens": 8, "temperature": 0,
              "extra_body": {"ignore_eos": True}}  # fmt: skip
    first = c.completions.create(**kwargs)  # type: ignore[call-overload]
    again = c.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].text == again.choices[0].text and first.usage.completion_tokens == 8
    assert_idle(server)


# --- graceful shutdown -------------------------------------------------------------------


def _stream_in_thread(server: ServerProcess, max_tokens: int) -> tuple[threading.Thread, dict]:
    """A chat stream read to its end on a thread; ``out`` gets the text, finish and events."""
    out: dict[str, object] = {"text": "", "finish": None, "error": None, "done": False}
    started = threading.Event()

    def run() -> None:
        body = {"model": "model", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "messages": [{"role": "user", "content": "Tell me a story."}]}  # fmt: skip
        with httpx.stream("POST", server.url + "/openai/v1/chat/completions", json=body,
                          timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out["error"] = event["error"]
                    continue
                choice = event["choices"][0]
                out["text"] = str(out["text"]) + (choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    out["finish"] = choice["finish_reason"]
                if out["text"]:
                    started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60), "the stream never started"
    return thread, out


@contextlib.contextmanager
def _sigterm_mid_stream(
    shutdown_timeout: str, max_tokens: int
) -> Iterator[tuple[ServerProcess, threading.Thread, dict[str, object]]]:
    """SmolLM2 on the HF backend streaming ``max_tokens`` when SIGTERM arrives; exits 0."""
    server = start_server(["--backend", "huggingface", "--shutdown_timeout", shutdown_timeout])
    try:
        thread, out = _stream_in_thread(server, max_tokens=max_tokens)
        server.proc.send_signal(signal.SIGTERM)
        yield server, thread, out
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_sigterm_drains_in_flight_streams_then_exits_0() -> None:
    with _sigterm_mid_stream("60", max_tokens=60) as (server, thread, out):
        time.sleep(0.3)
        # Still listening, but not ready and refusing new work with a reason.
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        late = httpx.post(server.url + "/openai/v1/completions",
                          json={"model": "model", "prompt": "Hi", "max_tokens": 2})  # fmt: skip
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        thread.join(120)
        assert out["finish"] == "length" and out["done"] and out["error"] is None, out
    assert "stopping: readiness is 503" in server.log()


def test_streams_past_the_shutdown_timeout_end_with_an_error_event() -> None:
    with _sigterm_mid_stream("1", max_tokens=250) as (server, thread, out):
        thread.join(60)
        assert not thread.is_alive()
        assert out["finish"] is None and out["done"], out
        error = out["error"]
        assert isinstance(error, dict) and error["code"] == 503, out
    assert "still in flight after 1 s: aborting them" in server.log()


# --- API key -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed() -> ServerProcess:
    grpc_port = free_port()
    server = start_server(
        ["--model_dir", str(model_path("embedding_mean")), "--enable_grpc", "--grpc_port",
         str(grpc_port)], env={"LMSERVE_API_KEY": "k-123"},
    )  # fmt: skip
    server.grpc_port = grpc_port  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_api_key_from_the_environment_guards_openai_v1_v2(keyed: ServerProcess) -> None:
    good = openai.OpenAI(base_url=keyed.url + "/openai/v1", api_key="k-123", max_retries=0)
    bad = openai.OpenAI(base_url=keyed.url + "/openai/v1", api_key="nope", max_retries=0)
    with good, bad:
        assert len(good.embeddings.create(model="model", input="hello").data[0].embedding) == 64
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="model", input="hello")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.post(keyed.url + "/v1/models/model:predict",
                      json={"instances": ["a"]}).status_code == 401  # fmt: skip
    for open_path in ("/v2/health/ready", "/v2/models/model/ready", "/metrics"):
        assert httpx.get(keyed.url + open_path).status_code == 200

    text = np.array([b"hello world"], dtype=object)
    with httpclient.InferenceServerClient(keyed.url.removeprefix("http://")) as triton:
        inp = httpclient.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(text)
        result = triton.infer("model", [inp], headers={"Authorization": "Bearer k-123"})
        assert result.as_numpy(result.get_response()["outputs"][0]["name"]).shape[-1] == 64
        with pytest.raises(InferenceServerException, match="API key"):
            triton.infer("model", [inp])
        assert triton.is_server_ready()  # health needs no key


def test_api_key_guards_grpc(keyed: ServerProcess) -> None:
    port = keyed.grpc_port  # type: ignore[attr-defined]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as triton:
        inp = grpcclient.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hello"], dtype=object))
        assert triton.is_server_live() and triton.is_model_ready("model")  # open
        with pytest.raises(InferenceServerException) as info:
            triton.infer("model", [inp])
        assert "UNAUTHENTICATED" in str(info.value.status())
        with pytest.raises(InferenceServerException):
            triton.get_model_metadata("model", headers={"authorization": "Bearer nope"})
        result = triton.infer("model", [inp], headers={"authorization": "Bearer k-123"})
        assert result.as_numpy(result.get_response().outputs[0].name).shape[-1] == 64
        meta = triton.get_model_metadata("model", headers={"authorization": "Bearer k-123"})
        assert meta.name == "model"


# --- gRPC: overload and cancelled calls ------------------------------------------------------


def test_grpc_overload_is_resource_exhausted_and_cancelled_calls_free_their_slots() -> None:
    grpc_port = free_port()
    # One request at a time and no queue: concurrent calls must be refused, not queued.
    server = start_server(["--model_dir", str(model_path("sentiment")), "--enable_grpc",
                           "--grpc_port", str(grpc_port), "--max_batch_size", "1",
                           "--max_queued_requests", "0", "--max_instances_per_request", "4096"])  # fmt: skip
    request = pb.ModelInferRequest(model_name="model")
    request.inputs.add(name="text", datatype="BYTES", shape=[512])
    request.inputs[0].contents.bytes_contents.extend([("great movie " * 40).encode()] * 512)

    async def call(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float | None) -> str:
        try:
            await stub.ModelInfer(request, timeout=timeout)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailers = dict(exc.trailing_metadata() or ())
                assert int(trailers["retry-after"]) >= 1, trailers
                assert "--max_queued_requests" in (exc.details() or "")
            return exc.code().name

    async def scenario() -> tuple[list[str], list[str]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            burst = await asyncio.gather(*(call(stub, None) for _ in range(6)))
            cancelled = await asyncio.gather(*(call(stub, 0.01) for _ in range(20)))
            return burst, cancelled

    try:
        burst, cancelled = asyncio.run(scenario())
        assert "OK" in burst and "RESOURCE_EXHAUSTED" in burst, burst
        assert set(burst) <= {"OK", "RESOURCE_EXHAUSTED"}, burst
        assert "DEADLINE_EXCEEDED" in cancelled, cancelled
        assert_idle(server)  # abandoned calls gave their slots back
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            inp = grpcclient.InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([b"great movie"], dtype=object))
            assert client.infer("model", [inp]).as_numpy("output-0") is not None
    finally:
        assert server.stop() == 0
