"""lmserve_server.build in-process, with a fake backend: lmserve mounted in a user's FastAPI
app, the model loaded by the user's lifespan (which must enter lmserve's: Starlette does not
run a mounted app's lifespan), background loading, single use, and a light ``import``.

tests/test_library_e2e.py runs examples/fastapi_embed.py with a real model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import lmserve_server
from lmserve_core.backend import LoadedEncoder, LoadRequest
from lmserve_core.encoder import EncoderOptions, ModelInfo
from lmserve_core.errors import BackendError, ConfigurationError
from lmserve_core.model_files import ModelSource
from lmserve_core.model_host import ModelState
from lmserve_core.plan import ServingPlan
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding
from lmserve_server import LmserveApp, build


class WordTokenizer:
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
            out.append(Encoding([5] * n, [0] * n, [(0, 0)] * n, [0] * n, list(range(n))))
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)


class FakeBackend:
    """Class 1 (POS) for every row."""

    def __init__(self) -> None:
        self.closed = False

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        n = inputs["input_ids"].shape[0]
        return np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (n, 1))

    def close(self) -> None:
        self.closed = True

    def check_health(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """build() plans a fake model; loading waits for ``gate`` and fails when ``fail`` is set."""
    state: dict[str, object] = {"gate": threading.Event(), "fail": False, "backend": FakeBackend()}
    state["gate"].set()  # type: ignore[attr-defined]

    def factory(request: LoadRequest) -> LoadedEncoder:
        assert state["gate"].wait(10)  # type: ignore[attr-defined]
        if state["fail"]:
            raise BackendError("weights are corrupt")
        info = ModelInfo(id2label={0: "NEG", 1: "POS"}, max_length=16)
        return LoadedEncoder(state["backend"], WordTokenizer(), info, EncoderOptions())  # type: ignore[arg-type]

    def plan(settings: ServeSettings) -> ServingPlan:
        return ServingPlan(
            ModelSource(Path("."), "fake"), {}, Task.sequence_classification, "fake", "test"
        )

    monkeypatch.setattr("lmserve_core.model_host.plan_serving", plan)
    monkeypatch.setattr("lmserve_core.model_host.load_backend_factory", lambda name: factory)
    return state


def user_app(lm: LmserveApp, prefix: str = "/lm") -> FastAPI:
    """What examples/fastapi_embed.py does: the user's route, lmserve mounted, one lifespan."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("user startup")
        async with lm.lifespan():
            events.append(f"model {lm.host.state.value}")
            yield
        events.append(f"model {lm.host.state.value}")

    app = FastAPI(lifespan=lifespan)
    app.state.events = events

    @app.get("/hello")
    async def hello() -> dict[str, object]:
        return {"hello": "world", "model_ready": lm.ready}

    app.mount(prefix, lm.app)
    return app


def test_mounted_under_a_prefix_with_the_users_lifespan(fake: dict[str, object]) -> None:
    lm = build(ServeSettings(model_name="sst2"))
    app = user_app(lm)
    assert lm.host.state is ModelState.loading and not lm.ready  # nothing loads at build
    with TestClient(app) as c:  # runs the user's lifespan, as uvicorn does
        assert app.state.events == ["user startup", "model ready"]
        assert c.get("/hello").json() == {"hello": "world", "model_ready": True}
        assert c.get("/lm/v2/health/ready").json() == {"ready": True}
        assert c.get("/lm/v2/models/sst2/ready").status_code == 200
        r = c.post("/lm/v1/models/sst2:predict", json={"instances": ["a b", "c"]})
        assert r.json() == {"predictions": [1, 1]}
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
        r = c.post("/lm/v2/models/sst2/infer", json=body)
        assert r.status_code == 200 and r.json()["model_name"] == "sst2"
        assert c.get("/lm/openai/v1/models").json()["data"][0]["id"] == "sst2"
        # lmserve's own error bodies and middleware apply under the prefix, not outside it.
        r = c.post("/lm/v1/models/other:predict", json={"instances": ["a"]})
        assert r.status_code == 404 and "sst2" in r.json()["error"]
        assert "x-request-id" in r.headers
        assert "x-request-id" not in c.get("/hello").headers
        assert c.get("/v2/health/ready").status_code == 404  # nothing leaks to the root
        assert "lmserve_requests" in c.get("/lm/metrics").text
    assert app.state.events[-1] == "model draining"
    assert lm.host.service is None and fake["backend"].closed  # type: ignore[attr-defined]
    assert not lm.ready


def test_mounted_at_the_root_after_the_users_routes(fake: dict[str, object]) -> None:
    lm = build()
    with TestClient(user_app(lm, prefix="/")) as c:
        assert c.get("/hello").json()["hello"] == "world"
        assert c.post("/v1/models/model:predict", json={"instances": ["x"]}).json() == {
            "predictions": [1]
        }
        assert c.get("/v2/health/ready").status_code == 200


def test_lifespan_as_the_apps_whole_lifespan_and_standalone(fake: dict[str, object]) -> None:
    lm = build(model_name="m")
    app = FastAPI(lifespan=lm.lifespan)
    app.mount("/lm", lm.app)
    with TestClient(app) as c:
        assert c.get("/lm/v2/health/ready").status_code == 200
    alone = build(model_name="m")
    with TestClient(alone.app) as c:  # served on its own, the sub-app runs the lifespan itself
        assert c.post("/v1/models/m:predict", json={"instances": ["x"]}).status_code == 200
    assert alone.host.state is ModelState.draining


def test_background_loading_answers_503_until_ready(fake: dict[str, object]) -> None:
    gate: threading.Event = fake["gate"]  # type: ignore[assignment]
    gate.clear()
    lm = build()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=lm.app)
        async with (
            lm.lifespan(wait=False),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            assert (await c.get("/v2/health/ready")).status_code == 503
            r = await c.post("/v1/models/model:predict", json={"instances": ["a"]})
            assert r.status_code == 503 and "loading" in r.json()["error"]
            assert (await c.get("/v2/health/live")).status_code == 200
            gate.set()
            for _ in range(200):
                if lm.ready:
                    break
                await asyncio.sleep(0.01)
            assert (await c.get("/v2/health/ready")).status_code == 200

    asyncio.run(scenario())
    assert lm.host.state is ModelState.draining


def test_stop_while_loading_in_the_background(fake: dict[str, object]) -> None:
    gate: threading.Event = fake["gate"]  # type: ignore[assignment]
    gate.clear()
    lm = build()

    async def scenario() -> None:
        async with lm.lifespan(wait=False):
            await asyncio.sleep(0.02)
        gate.set()

    asyncio.run(scenario())
    assert not lm.ready


def test_a_model_that_cannot_load_fails_the_startup(fake: dict[str, object]) -> None:
    fake["fail"] = True
    lm = build()
    app = user_app(lm)
    with pytest.raises(BackendError, match="corrupt"), TestClient(app):
        pass
    assert lm.host.state is ModelState.failed and "corrupt" in (lm.host.error or "")


def test_background_load_failure_keeps_readiness_503(fake: dict[str, object]) -> None:
    fake["fail"] = True
    lm = build()

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=lm.app)
        async with (
            lm.lifespan(wait=False),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            for _ in range(200):
                if lm.host.state is ModelState.failed:
                    break
                await asyncio.sleep(0.01)
            r = await c.post("/v1/models/model:predict", json={"instances": ["a"]})
            assert r.status_code == 503 and "corrupt" in r.json()["error"]
            assert (await c.get("/v2/health/ready")).status_code == 503

    asyncio.run(scenario())


def test_each_app_is_used_once(fake: dict[str, object]) -> None:
    lm = build()

    async def scenario() -> None:
        async with lm.lifespan():
            pass
        with pytest.raises(RuntimeError, match="build"):
            async with lm.lifespan():
                pass

    asyncio.run(scenario())


def test_settings_from_python(fake: dict[str, object]) -> None:
    base = ServeSettings(model_name="a", max_batch_size=4)
    lm = build(base, model_name="b", task="fill-mask")
    assert lm.settings.model_name == "b" and lm.settings.max_batch_size == 4
    assert lm.settings.task is Task.fill_mask and lm.model_name == "b"
    assert repr(lm).startswith("LmserveApp(model_name='b'")
    with pytest.raises(ValueError, match="max_batch_size"):
        build(max_batch_size=0)


def test_a_bad_model_directory_fails_at_build(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        build(model_dir=str(tmp_path / "missing"))


def test_import_stays_light_and_names_are_public() -> None:
    code = "import sys, json, lmserve_server; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(r.stdout))
    assert not {"fastapi", "uvicorn", "lmserve_server.app"} & loaded
    for name in lmserve_server.__all__:
        assert getattr(lmserve_server, name) is not None
    assert set(lmserve_server.__all__) <= set(dir(lmserve_server))
    with pytest.raises(AttributeError):
        _ = lmserve_server.nope  # type: ignore[attr-defined]


def test_path_rules_hold_under_the_prefix(fake: dict[str, object]) -> None:
    """Error bodies by protocol, the API key's open health routes, and metrics scrapes are
    decided on the path inside lmserve's app, not the user's prefix."""
    lm = build(api_key="s3cret")
    with TestClient(user_app(lm)) as c:
        r = c.post("/lm/openai/v1/embeddings", json={"model": "model", "input": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer s3cret"}
        r = c.post("/lm/openai/v1/embeddings", json={"model": "nope", "input": "x"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"  # OpenAI's body
        r = c.post("/lm/v1/models/nope:predict", json={"instances": ["a"]}, headers=auth)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)  # KServe's body
        assert c.get("/lm/v2/health/ready").status_code == 200  # probes need no key
        assert c.get("/lm/v2/models/model/ready").status_code == 200
        assert c.get("/lm/v2/models/model").status_code == 401
        assert c.get("/hello").status_code == 200  # the user's routes are the user's business
        c.get("/lm/metrics")
        scrape = c.get("/lm/metrics").text
        assert "lmserve_requests_total" in scrape and 'route="/metrics"' not in scrape


def test_build_refuses_api_workers() -> None:
    """Worker processes are lmserve serve's; an embedded app runs in its host's processes."""
    with pytest.raises(ConfigurationError, match="api_workers=2") as info:
        build(model_dir="/nonexistent", api_workers=2)
    assert info.value.param == "api_workers"
