"""The app in-process with a fake backend: readiness while loading, health during a forward,
overload (429), instance caps, draining, API keys, CORS and backend faults.

A fake backend that blocks each forward lets these tests hold requests in flight at will; the
same behaviours run against real servers in tests/test_reliability_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmserve_core import plan as plan_module
from lmserve_core.backend import LoadedEncoder, LoadRequest
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import (
    BackendError,
    ClientDisconnected,
    InputTooLong,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PredictorError,
)
from lmserve_core.model_files import ModelSource
from lmserve_core.model_host import ModelHost
from lmserve_core.plan import ServingPlan
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding
from lmserve_server.app import create_app
from lmserve_server.metrics import Metrics


class WordTokenizer:
    """Whitespace tokens; every word is id 5."""

    pad_token_id = 0
    mask_token_id = 4
    mask_token = "[MASK]"
    padding_side = "right"

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        out = []
        for text in texts:
            n = len(text.split()) or 1
            if max_length is not None:
                n = min(n, max_length)
            out.append(Encoding([5] * n, [0] * n, [(0, 0)] * n, [0] * n, list(range(n))))
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)


class GatedBackend:
    """Blocks each forward until ``release`` is set, so tests can act mid-forward."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(10)
        n = inputs["input_ids"].shape[0]
        return np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (n, 1))

    def close(self) -> None:
        pass

    def check_health(self) -> None:
        pass


def make(
    monkeypatch: pytest.MonkeyPatch,
    backend: GatedBackend,
    load_gate: threading.Event | None = None,
    **settings_kwargs: object,
):
    def factory(request: LoadRequest) -> LoadedEncoder:
        if load_gate is not None:
            assert load_gate.wait(10)
        return LoadedEncoder(backend, WordTokenizer(), ModelInfo(id2label={0: "NEG", 1: "POS"}, max_length=16),
                             EncoderOptions())  # fmt: skip

    monkeypatch.setattr(plan_module, "load_backend_factory", lambda name: factory)
    monkeypatch.setattr("lmserve_core.model_host.load_backend_factory", lambda name: factory)
    settings = ServeSettings(**settings_kwargs)  # type: ignore[arg-type]
    plan = ServingPlan(
        ModelSource(Path("."), "fake"), {}, Task.sequence_classification, "fake", "test"
    )
    metrics = Metrics()
    host = ModelHost(settings, plan, observer=metrics)
    return host, create_app(settings, host, metrics)


def test_ready_is_503_while_loading_then_200(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    backend = GatedBackend()
    backend.release.set()
    host, app = make(monkeypatch, backend, load_gate=gate)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            loading = asyncio.create_task(host.load())
            await asyncio.sleep(0.05)
            assert (await c.get("/v2/health/ready")).status_code == 503
            assert (await c.get("/v2/models/model/ready")).status_code == 503
            assert (await c.get("/v2/health/live")).status_code == 200
            r = await c.post("/v1/models/model:predict", json={"instances": ["a"]})
            assert r.status_code == 503 and "loading" in r.json()["error"]
            gate.set()
            await loading
            assert (await c.get("/v2/health/ready")).status_code == 200
            await host.close()

    asyncio.run(scenario())


def test_one_model_under_several_served_names(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = GatedBackend()
    backend.release.set()
    host, app = make(monkeypatch, backend, served_model_name=["sentiment", "classifier"])

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await host.load()
            assert (await c.get("/v1/models")).json() == {"models": ["sentiment", "classifier"]}
            listed = (await c.get("/openai/v1/models")).json()["data"]
            assert [card["id"] for card in listed] == ["sentiment", "classifier"]
            for name in ("sentiment", "classifier"):
                r = await c.post(f"/v1/models/{name}:predict", json={"instances": ["a"]})
                assert r.status_code == 200, r.text
                assert (await c.get(f"/v2/models/{name}")).json()["name"] == name
                assert (await c.get(f"/v2/models/{name}/ready")).status_code == 200
            # The default name is not served unless --model_name says so.
            missing = await c.post("/v1/models/model:predict", json={"instances": ["a"]})
            assert missing.status_code == 404 and "'sentiment', 'classifier'" in missing.text
            metrics = (await c.get("/metrics")).text
            assert 'lmserve_model_ready{model="sentiment"} 1.0' in metrics
            await host.close()

    asyncio.run(scenario())


def test_health_answers_while_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = GatedBackend()
    host, app = make(monkeypatch, backend)

    async def scenario() -> None:
        await host.load()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            pending = asyncio.create_task(
                c.post("/v1/models/model:predict", json={"instances": ["a b"]})
            )
            await asyncio.to_thread(backend.entered.wait, 5)
            # The forward pass is blocked; the event loop must still answer.
            r = await asyncio.wait_for(c.get("/v2/health/ready"), timeout=2)
            assert r.status_code == 200
            # A second request queues behind the running forward and joins the next batch.
            second = asyncio.create_task(
                c.post("/v1/models/model:predict", json={"instances": ["c"]})
            )
            await asyncio.sleep(0.05)
            backend.release.set()
            assert (await pending).json() == {"predictions": [1]}
            assert (await second).json() == {"predictions": [1]}
        await host.close()

    asyncio.run(scenario())
    assert backend.threads and all(name.startswith("lmserve-") for name in backend.threads)


def test_openapi_schema_lists_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    _, app = make(monkeypatch, GatedBackend())
    paths = app.openapi()["paths"]
    for route in ("/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer",
                  "/openai/v1/embeddings", "/openai/v1/models", "/v2/health/ready", "/metrics"):  # fmt: skip
        assert route in paths
    body = paths["/v2/models/{model_name}/infer"]["post"]["requestBody"]
    assert "inputs" in body["content"]["application/json"]["schema"]["properties"]


def test_openapi_documents_every_route_with_its_response_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, app = make(monkeypatch, GatedBackend())
    schema = app.openapi()
    components = schema["components"]["schemas"]
    undocumented = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if path in ("/", "/metrics"):  # {"status": "alive"}; the Prometheus text format
                continue
            ok = operation["responses"].get("200", {}).get("content", {})
            if path.endswith("_lora_adapter"):  # vLLM's answer: "Success: ..." as plain text
                if ok.get("text/plain", {}).get("schema") != {"type": "string"}:
                    undocumented.append(f"{method.upper()} {path}")
                continue
            ref = ok.get("application/json", {}).get("schema", {}).get("$ref")
            if ref is None or ref.rsplit("/", 1)[-1] not in components:
                undocumented.append(f"{method.upper()} {path}")
    assert undocumented == []
    chat = schema["paths"]["/openai/v1/chat/completions"]["post"]["responses"]
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionResponse"
    )
    assert chat["200"]["content"]["text/event-stream"]["schema"]["$ref"].endswith(
        "/ChatCompletionChunk"
    )
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorResponse"
    )
    predict = schema["paths"]["/v1/models/{model_name}:predict"]["post"]["responses"]
    assert predict["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")
    # Every reference resolves (the stream chunks and the models they use were added).
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert refs <= set(components), refs - set(components)
    assert {"ChatCompletionChunk", "CompletionChunk", "ChatDelta"} <= set(components)


class DownPredictor(GatedBackend):
    """A remote predictor that is down: every forward fails, health says why."""

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        raise PredictorError("Triton at 10.0.0.1:8001 cannot be reached: connection refused")

    def check_health(self) -> None:
        raise ModelNotReady("Triton at 10.0.0.1:8001 cannot be reached")


def test_a_failing_predictor_is_502_and_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    host, app = make(monkeypatch, DownPredictor())

    async def scenario() -> None:
        await host.load()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/v2/health/ready")).status_code == 503
            assert (await c.get("/v2/models/model/ready")).status_code == 503
            assert (await c.get("/v2/health/live")).status_code == 200
            r = await c.post("/v1/models/model:predict", json={"instances": ["a"]})
            assert r.status_code == 502 and "cannot be reached" in r.json()["error"]
            body = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
            assert (await c.post("/v2/models/model/infer", json=body)).status_code == 502
        await host.close()

    asyncio.run(scenario())


def test_grpc_maps_predictor_errors_to_unavailable() -> None:
    import grpc

    from lmserve_server.grpc_service import status_code

    assert status_code(PredictorError("x")) is grpc.StatusCode.UNAVAILABLE
    assert status_code(BackendError("x")) is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("error", "http", "kind", "grpc_code"),
    [
        (InvalidInput("x", param="n"), 400, "invalid_request_error", "INVALID_ARGUMENT"),
        (InputTooLong("x"), 400, "invalid_request_error", "INVALID_ARGUMENT"),
        (ModelNotFound("x"), 404, "not_found_error", "NOT_FOUND"),
        (Overloaded("x"), 429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
        (ClientDisconnected("x"), 499, "client_closed_request", "CANCELLED"),
        (ModelNotReady("x"), 503, "service_unavailable", "UNAVAILABLE"),
        (PredictorError("x"), 502, "bad_gateway", "UNAVAILABLE"),
        (BackendError("x"), 500, "internal_server_error", "INTERNAL"),
    ],
)
def test_one_status_table_for_http_grpc_and_streams(
    error: LmserveError, http: int, kind: str, grpc_code: str
) -> None:
    import grpc

    from lmserve_server.errors import status_of, stream_error_event
    from lmserve_server.grpc_service import status_code

    assert (status_of(error).http, status_of(error).kind) == (http, kind)
    assert status_code(error) is grpc.StatusCode[grpc_code]
    event = json.loads(stream_error_event(error))["error"]
    assert event == {"message": "x", "type": kind, "param": error.param, "code": http}


def test_an_unexpected_error_mid_stream_is_a_500_event_without_details() -> None:
    from lmserve_server.errors import stream_error_event

    event = json.loads(stream_error_event(RuntimeError("secret detail")))["error"]
    assert event["code"] == 500 and event["type"] == "internal_server_error"
    assert "secret" not in event["message"] and "RuntimeError" in event["message"]


# --- reliability and security -------------------------------------------------------
PREDICT = "/v1/models/model:predict"
V2_BODY = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}


def client(app: object, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers=headers,  # type: ignore[arg-type]
    )


def test_a_full_queue_answers_429_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = GatedBackend()
    host, app = make(monkeypatch, backend, max_batch_size=1, max_queued_requests=1)

    async def scenario() -> None:
        await host.load()
        async with client(app) as c:
            running = asyncio.create_task(c.post(PREDICT, json={"instances": ["a"]}))
            await asyncio.to_thread(backend.entered.wait, 5)
            queued = asyncio.create_task(c.post(PREDICT, json={"instances": ["b"]}))
            await asyncio.sleep(0.05)
            assert host.gate.in_flight == 2
            refused = await c.post(PREDICT, json={"instances": ["c"]})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert "--max_queued_requests" in refused.json()["error"]
            v2 = await c.post("/v2/models/model/infer", json=V2_BODY)
            assert v2.status_code == 429 and "retry-after" in v2.headers
            emb = await c.post("/openai/v1/embeddings", json={"model": "model", "input": "x"})
            assert emb.status_code in (400, 429)  # not an embedding model: refused either way
            backend.release.set()
            assert (await running).status_code == 200
            assert (await queued).status_code == 200
            assert host.gate.in_flight == 0
            assert (await c.post(PREDICT, json={"instances": ["d"]})).status_code == 200
        await host.close()

    asyncio.run(scenario())


def test_too_many_instances_is_a_400_naming_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = GatedBackend()
    backend.release.set()
    host, app = make(monkeypatch, backend, max_instances_per_request=2)

    async def scenario() -> None:
        await host.load()
        async with client(app) as c:
            r = await c.post(PREDICT, json={"instances": ["a", "b", "c"]})
            assert r.status_code == 400
            assert "--max_instances_per_request" in r.json()["error"]
            assert (await c.post(PREDICT, json={"instances": ["a", "b"]})).status_code == 200
        await host.close()

    asyncio.run(scenario())


def test_draining_refuses_new_work_and_lets_in_flight_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = GatedBackend()
    host, app = make(monkeypatch, backend)

    async def scenario() -> None:
        await host.load()
        async with client(app) as c:
            in_flight = asyncio.create_task(c.post(PREDICT, json={"instances": ["a"]}))
            await asyncio.to_thread(backend.entered.wait, 5)
            host.start_draining()
            assert (await c.get("/v2/health/ready")).status_code == 503
            assert (await c.get("/v2/health/live")).status_code == 200
            late = await c.post(PREDICT, json={"instances": ["b"]})
            assert late.status_code == 503 and "shutting down" in late.json()["error"]
            assert not await host.gate.wait_idle(0.05)
            backend.release.set()
            assert (await in_flight).json() == {"predictions": [1]}
            assert await host.gate.wait_idle(2)
        await host.close()
        await host.close()  # idempotent

    asyncio.run(scenario())


def test_api_key_guards_inference_and_metadata_not_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = GatedBackend()
    backend.release.set()
    host, app = make(monkeypatch, backend, api_key="s3cret")
    guarded = [("POST", PREDICT, {"instances": ["a"]}), ("POST", "/v2/models/model/infer", V2_BODY),
               ("GET", "/v2/models/model", None), ("GET", "/v1/models", None), ("GET", "/v2", None),
               ("GET", "/openai/v1/models", None),
               ("POST", "/openai/v1/embeddings", {"model": "model", "input": "a"})]  # fmt: skip
    open_ = ["/", "/v2/health/live", "/v2/health/ready", "/v2/models/model/ready",
             "/v1/models/model", "/metrics"]  # fmt: skip

    async def scenario() -> None:
        await host.load()
        async with client(app) as anon, client(app, authorization="Bearer wrong") as wrong, \
                client(app, authorization="bearer s3cret") as good:  # fmt: skip
            for method, path, body in guarded:
                for c in (anon, wrong):
                    r = await c.request(method, path, json=body)
                    assert r.status_code == 401, (path, r.text)
                    assert r.headers["www-authenticate"] == "Bearer"
                r = await good.request(method, path, json=body)
                assert r.status_code != 401, path
            openai_401 = (await anon.get("/openai/v1/models")).json()
            assert openai_401["error"]["type"] == "authentication_error"
            for path in open_:
                assert (await anon.get(path)).status_code == 200, path
            assert (await good.post(PREDICT, json={"instances": ["a"]})).json() == {
                "predictions": [1]
            }
        await host.close()

    asyncio.run(scenario())


def test_cors_is_off_unless_origins_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}  # fmt: skip

    async def run(app: object) -> httpx.Response:
        async with client(app) as c:
            return await c.options(PREDICT, headers=preflight)

    _, closed = make(monkeypatch, GatedBackend())
    r = asyncio.run(run(closed))
    assert "access-control-allow-origin" not in r.headers
    _, opened = make(monkeypatch, GatedBackend(), allowed_origins="https://app.example",
                     api_key="k")  # fmt: skip
    r = asyncio.run(run(opened))
    assert r.status_code == 200  # the preflight passes the API key check: it has no credentials
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    other = dict(preflight, origin="https://evil.example")

    async def run_other() -> httpx.Response:
        async with client(opened) as c:
            return await c.options(PREDICT, headers=other)

    assert "access-control-allow-origin" not in asyncio.run(run_other()).headers


class FaultyBackend(GatedBackend):
    """Raises in a forward pass when an input has exactly three words."""

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if int(inputs["attention_mask"].sum(axis=1).max()) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        n = inputs["input_ids"].shape[0]
        return np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (n, 1))


def test_a_forward_fault_fails_only_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    host, app = make(monkeypatch, FaultyBackend())

    async def scenario() -> None:
        await host.load()
        async with client(app) as c:
            r = await c.post(PREDICT, json={"instances": ["a b c"]})
            assert r.status_code == 500
            assert "illegal memory access" in r.json()["error"]
            assert (await c.post(PREDICT, json={"instances": ["a b"]})).status_code == 200
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert host.gate.in_flight == 0
        await host.close()

    asyncio.run(scenario())
