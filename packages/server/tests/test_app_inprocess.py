"""The app in-process with a fake backend: readiness while loading, health during a forward."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmserve_core.backend import LoadedEncoder, LoadRequest
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import BackendError, ModelNotReady, PredictorError
from lmserve_core.model_files import ModelSource
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding
from lmserve_server import plan as plan_module
from lmserve_server.app import create_app
from lmserve_server.model_host import ModelHost
from lmserve_server.plan import ServingPlan


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
    monkeypatch: pytest.MonkeyPatch, backend: GatedBackend, load_gate: threading.Event | None = None
):
    def factory(request: LoadRequest) -> LoadedEncoder:
        if load_gate is not None:
            assert load_gate.wait(10)
        return LoadedEncoder(backend, WordTokenizer(), ModelInfo(id2label={0: "NEG", 1: "POS"}, max_length=16),
                             EncoderOptions(), "fake")  # fmt: skip

    monkeypatch.setattr(plan_module, "load_backend_factory", lambda name: factory)
    monkeypatch.setattr("lmserve_server.model_host.load_backend_factory", lambda name: factory)
    settings = ServeSettings()
    plan = ServingPlan(
        ModelSource(Path("."), "fake"), {}, Task.sequence_classification, "fake", "test"
    )
    host = ModelHost(settings, plan)
    return host, create_app(settings, host)


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
