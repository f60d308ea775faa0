"""lmserve used as a library (issue 10): examples/fastapi_embed.py (lmserve mounted in the user's
own FastAPI app, loaded by the user's lifespan) answers exactly as a plain ``lmserve serve`` of
the same model, and examples/protocols_client.py talks to a real server with nothing from
lmserve but lmserve_protocols.

The in-process side of the embedding API is in packages/server/tests/test_embed.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from _support.servers import ServerProcess, free_port, wait_until_ready
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PREFIX = "/lm"
TEXTS = ["i really love this movie", "i hate this", "what a day"]


def start_embedded(*args: str) -> tuple[ServerProcess, str]:
    """examples/fastapi_embed.py as its own process; (lmserve under the prefix, the app's root)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="lmserve-embed-", suffix=".log")[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXAMPLES / "fastapi_embed.py"), "--port", str(port), *args]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    server = ServerProcess(root + PREFIX, proc, log, list(args))
    wait_until_ready(server, 180)  # polls {prefix}/v2/health/ready
    return server, root


@pytest.fixture(scope="module")
def sentiment_dir() -> str:
    return str(model_path("sentiment"))


@pytest.fixture(scope="module")
def embedded_sentiment(sentiment_dir: str) -> Iterator[tuple[ServerProcess, str]]:
    server, root = start_embedded("--model_dir", sentiment_dir)
    yield server, root
    server.stop()


def predict(url: str, body: dict[str, object]) -> httpx.Response:
    r = httpx.post(f"{url}/v1/models/model:predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def assert_same(got: object, want: object, path: str = "") -> None:
    """Equal JSON, floats to 1e-5 (a process with other torch threads may round differently)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, path


def test_embedded_routes_match_a_plain_server(
    embedded_sentiment: tuple[ServerProcess, str], sentiment_dir: str, server_pool: Pool
) -> None:
    embedded, root = embedded_sentiment
    plain = server_pool("--model_dir", sentiment_dir)

    # The user's own routes, next to lmserve's.
    hello = httpx.get(root + "/hello").json()
    assert hello["model_ready"] is True and hello["task"] == "sequence_classification"
    # Readiness lives under the prefix; nothing of lmserve's leaks to the root.
    assert httpx.get(embedded.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(embedded.url + "/v2/models/model/ready").status_code == 200
    assert httpx.get(embedded.url + "/v2/health/live").status_code == 200
    assert httpx.get(root + "/v2/health/ready").status_code == 404

    # KServe V1: identical predictions (ids, and labels with scores).
    body: dict[str, object] = {"instances": TEXTS}
    ids = predict(embedded.url, body)
    assert ids.json() == predict(plain.url, body).json()
    assert ids.json()["predictions"][:2] == [1, 0]
    assert ids.headers.get("x-request-id")  # lmserve's middleware runs under the mount
    labels = {"instances": TEXTS, "parameters": {"output": "labels"}}
    got, want = predict(embedded.url, labels).json(), predict(plain.url, labels).json()
    assert_same(got, want)
    assert got["predictions"][0][0]["label"] == "POSITIVE"

    # V2 infer and model metadata: the same outputs.
    v2 = {"inputs": [{"name": "input-0", "shape": [3], "datatype": "BYTES", "data": TEXTS}]}
    e = httpx.post(embedded.url + "/v2/models/model/infer", json=v2, timeout=60).json()
    p = httpx.post(plain.url + "/v2/models/model/infer", json=v2, timeout=60).json()
    assert e["outputs"] == p["outputs"]
    e_meta = httpx.get(embedded.url + "/v2/models/model").json()
    p_meta = httpx.get(plain.url + "/v2/models/model").json()
    for key in ("name", "platform", "inputs", "outputs"):
        assert e_meta[key] == p_meta[key], key
    for key in ("task", "backend", "source"):
        assert e_meta["parameters"][key] == p_meta["parameters"][key], key

    # lmserve's error bodies: a KServe 404 for an unknown model, an OpenAI error for a
    # classifier asked for embeddings.
    r = httpx.post(embedded.url + "/v1/models/nope:predict", json=body)
    assert r.status_code == 404 and "not served here" in r.json()["error"]
    r = httpx.post(embedded.url + "/openai/v1/embeddings", json={"model": "model", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    # The user's route that calls the model in-process gives the same predictions.
    mine = httpx.post(root + "/predict", json={"texts": TEXTS}, timeout=60).json()
    assert mine["predictions"] == ids.json()["predictions"]
    assert "lmserve_requests" in httpx.get(embedded.url + "/metrics").text


def test_embedded_builtin_embeddings_match_a_plain_server(server_pool: Pool) -> None:
    plain = server_pool("--model_id", "all-minilm-l6-v2", "--model_name", "minilm")
    embedded, _ = start_embedded("--model_id", "all-minilm-l6-v2", "--model_name", "minilm")
    try:
        body = {"model": "minilm", "input": ["A man is eating food.", "The sky is blue."]}
        e = httpx.post(embedded.url + "/openai/v1/embeddings", json=body, timeout=60).json()
        p = httpx.post(plain.url + "/openai/v1/embeddings", json=body, timeout=60).json()
        assert e["usage"] == p["usage"] and e["model"] == "minilm"
        got = np.array([d["embedding"] for d in e["data"]])
        assert got.shape == (2, 384)
        assert np.allclose(got, [d["embedding"] for d in p["data"]], atol=1e-5)
        models = httpx.get(embedded.url + "/openai/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["minilm"]
    finally:
        assert embedded.stop() == 0, embedded.log()[-3000:]


def test_embedded_app_stops_cleanly_on_sigint(sentiment_dir: str) -> None:
    """Ctrl-C: uvicorn stops, the user's lifespan closes lmserve's, exit code 0."""
    server, _ = start_embedded("--model_dir", sentiment_dir, "--model_name", "sst2")
    assert httpx.get(server.url + "/v2/models/sst2/ready").status_code == 200
    assert server.stop() == 0, server.log()[-3000:]
    log = server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_embedded_app_with_a_bad_model_does_not_start(tmp_path: Path) -> None:
    """build() plans before uvicorn starts: a missing model directory fails at once."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "fastapi_embed.py"), "--model_dir",
                           str(tmp_path / "missing"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "missing" in done.stderr


# examples/protocols_client.py, run so that it reports every lmserve module it loaded.
GUARD = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
heavy = ("lmserve_core", "lmserve_server", "lmserve_backend_hf", "lmserve_backend_vllm",
         "numpy", "torch", "fastapi")
print("loaded:", sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy}))
"""


def run_protocols_client(server: ServerProcess, *args: str) -> str:
    script = str(EXAMPLES / "protocols_client.py")
    result = subprocess.run([sys.executable, "-c", GUARD, script, "--url", server.url, *args],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "loaded: []" in result.stdout  # nothing from lmserve but lmserve_protocols
    return result.stdout


def test_protocols_client_imports_only_lmserve_protocols() -> None:
    tree = ast.parse((EXAMPLES / "protocols_client.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    lmserve = {name.split(".")[0] for name in names if name.startswith("lmserve")}
    assert lmserve == {"lmserve_protocols"}


def test_protocols_client_against_a_classifier(server_pool: Pool, sentiment_dir: str) -> None:
    out = run_protocols_client(server_pool("--model_dir", sentiment_dir),
                               "--text", "i love this movie", "--text", "i hate this movie")  # fmt: skip
    assert re.search(r"^server: lmserve \S+ extensions=", out, re.M)
    assert "ready: True models: ['model'] v1 status: True" in out
    assert "task: sequence_classification platform: lmserve/huggingface" in out
    assert "v1 predictions: [1, 0]" in out
    assert "v2 id: protocols-client-1 model: model" in out
    assert re.search(r"^v2 output-0 INT64 \[2\]: \[1, 0\]$", out, re.M)
    assert "openai models: ['model']" in out
    assert "openai embeddings refused (400 invalid_request_error):" in out
    assert "unknown model: 404 " in out
    assert "invalid request caught locally: ('inputs',)" in out


def test_protocols_client_against_embeddings(server_pool: Pool) -> None:
    server = server_pool("--model_id", "all-minilm-l6-v2", "--model_name", "minilm")
    out = run_protocols_client(server, "--model", "minilm", "--text", "A man is eating food.")
    assert "task: text_embedding" in out
    assert re.search(r"^  output output-0 FP32 \[-1, 384\]$", out, re.M)
    assert re.search(r"^v2 output-0 FP32 \[1, 384\]: \[.*'\.\.\. 384 items'\]$", out, re.M)
    assert re.search(r"^openai embeddings: 1 vectors of \{384\} dimensions, \d+ prompt tokens$",
                     out, re.M)  # fmt: skip
