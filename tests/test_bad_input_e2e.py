"""Bad input gets a clear 4xx, never a 500, and the server stays up (issue 2)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(server_pool: Callable[..., ServerProcess]) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("sentiment")))


V1_BAD = [
    ({}, "instances"),
    ({"instances": []}, "non-empty"),
    ({"instances": "I love this"}, "non-empty list"),
    ({"instances": [1, 2]}, "string"),
    ({"instances": [None]}, "string"),
    ({"instances": [["nested"]]}, "string"),
    ({"instances": ["x"], "parameters": "nope"}, "parameters"),
    ({"instances": ["x"], "parameters": {"output": "everything"}}, "output"),
    ({"instances": ["x"], "parameters": {"top_k": 0}}, "top_k"),
    ({"instances": ["x"], "parameters": {"truncate": "no"}}, "truncate"),
]


@pytest.mark.parametrize("body,needle", V1_BAD)
def test_v1_bad_bodies(server: ServerProcess, body: dict[str, object], needle: str) -> None:
    with server.client() as c:
        r = c.post("/v1/models/model:predict", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def _tensor(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "t",
        "shape": [1],
        "datatype": "BYTES",
        "data": ["I love this"],
    }
    return {"inputs": [{**base, **overrides}]}


V2_BAD = [
    (_tensor(datatype="INT64", data=[1]), "BYTES"),
    (_tensor(datatype="FLOAT99"), "datatype"),
    (_tensor(shape=[2]), "elements"),
    (_tensor(shape=[-1]), "shape"),
    (_tensor(data=[5]), "strings"),
    (_tensor(data=None), "no data"),
    ({"inputs": []}, "inputs"),
    ({"inputs": [{"name": "t"}]}, "inputs"),
    ({"nothing": 1}, "inputs"),
    ({**_tensor(), "outputs": [{"name": "missing"}]}, "missing"),
]


@pytest.mark.parametrize("body,needle", V2_BAD)
def test_v2_bad_bodies(server: ServerProcess, body: dict[str, object], needle: str) -> None:
    with server.client() as c:
        r = c.post("/v2/models/model/infer", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_malformed_json_and_binary_headers(server: ServerProcess) -> None:
    with server.client() as c:
        for path in ("/v1/models/model:predict", "/v2/models/model/infer"):
            r = c.post(path, content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "JSON" in r.json()["error"]
        body = json.dumps(_tensor()).encode()
        for header in ("abc", "0", str(len(body) + 10)):
            r = c.post("/v2/models/model/infer", content=body,
                       headers={"Inference-Header-Content-Length": header})  # fmt: skip
            assert r.status_code == 400, header
        # binary_data_size that runs past the body
        head = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 100}}]}).encode()  # fmt: skip
        r = c.post("/v2/models/model/infer", content=head + b"\x01\x00\x00\x00a",
                   headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
        assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


def test_unknown_model_is_404_everywhere(server: ServerProcess) -> None:
    with server.client() as c:
        assert c.post("/v1/models/nope:predict", json={"instances": ["x"]}).status_code == 404
        assert c.post("/v2/models/nope/infer", json=_tensor()).status_code == 404
        assert c.get("/v1/models/nope").status_code == 404
        assert c.get("/no/such/route").status_code == 404


def test_body_over_limit_is_413(server_pool: Callable[..., ServerProcess]) -> None:
    small = server_pool(
        "--model_dir", str(model_path("sentiment")), "--max_request_body_bytes", "1024"
    )
    with small.client() as c:
        r = c.post("/v1/models/model:predict", json={"instances": ["x" * 2000]})
        assert r.status_code == 413 and "1024" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            yield b'{"instances": ["'
            for _ in range(10):
                yield b"y" * 200
            yield b'"]}'

        r = c.post("/v1/models/model:predict", content=chunks())
        assert r.status_code == 413
        r = c.post("/openai/v1/embeddings", content=b"x" * 5000)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        assert c.post("/v1/models/model:predict", json={"instances": ["ok"]}).status_code == 200


def test_a_lone_surrogate_is_a_400_on_every_text_route(
    server: ServerProcess, server_pool: Callable[..., ServerProcess]
) -> None:
    """JSON can carry a lone UTF-16 surrogate (an escaped \\ud800) that no tokenizer takes."""
    bad = "I love \ud800 this"
    headers = {"content-type": "application/json"}
    with server.client(headers=headers) as c:
        # json.dumps escapes it (httpx's json= cannot even encode it).
        r = c.post("/v1/models/model:predict", content=json.dumps({"instances": ["ok", bad]}))
        assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text
    generator = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    with generator.client(headers=headers) as c:
        for path, body in (
            ("/openai/v1/completions", {"model": "model", "prompt": bad, "max_tokens": 2}),
            ("/openai/v1/chat/completions",
             {"model": "model", "messages": [{"role": "user", "content": bad}], "max_tokens": 2}),
        ):  # fmt: skip
            r = c.post(path, content=json.dumps(body))
            assert r.status_code == 400, (path, r.text)
            assert "surrogate" in r.json()["error"]["message"]
    assert "Traceback" not in generator.log()


def test_server_survives_everything(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.post("/v1/models/model:predict", json={"instances": ["I love this"]})
    assert r.status_code == 200 and r.json() == {"predictions": [1]}
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()
