"""Transformer mode (docs/behaviour.md §6): lmserve tokenizes, a real Triton server runs the model.

``lmserve export`` writes one repository with a model per encoder task; pytriton's bundled
``tritonserver`` serves it (``_support/triton.py``); lmserve in transformer mode, over both
predictor protocols, must answer V1, V2 and OpenAI requests exactly as lmserve serving the same
model in-process does (floats within the ONNX-vs-PyTorch tolerance).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from _support.encoder_parity import (
    MODELS,
    TENSORS,
    assert_close,
    post,
    requests_for,
    serve_args,
)
from _support.servers import ServerProcess, free_port, free_ports, start_server
from _support.tiny_models import model_path
from _support.triton import TritonServer, serve_exported

pytestmark = pytest.mark.slow

PROTOCOLS = ("v2", "grpc-v2")


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model repository ``lmserve export`` writes (filled by the ``triton`` fixture)."""
    return tmp_path_factory.mktemp("triton-repo")


@pytest.fixture(scope="module")
def triton(triton_repo: Path) -> Iterator[TritonServer]:
    models = {name: (model_path(model), task) for name, (model, task) in MODELS.items()}
    server = serve_exported(triton_repo, models, TENSORS.split(","))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def transformer(triton: TritonServer) -> Iterator[Callable[[str, str], ServerProcess]]:
    """lmserve in transformer mode per (model, protocol), started once, stopped before Triton."""
    servers: dict[tuple[str, str], ServerProcess] = {}

    def get(name: str, protocol: str) -> ServerProcess:
        key = (name, protocol)
        if key not in servers:
            host = triton.http_host if protocol == "v2" else triton.grpc_url
            servers[key] = start_server([*serve_args(name), "--predictor_host", host,
                                         "--predictor_protocol", protocol,
                                         "--tensor_input_names", TENSORS])  # fmt: skip
        return servers[key]

    yield get
    for server in servers.values():
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_same_answers_as_in_process(
    name: str,
    protocol: str,
    transformer: Callable[[str, str], ServerProcess],
    server_pool: Callable[..., ServerProcess],
) -> None:
    remote, local = transformer(name, protocol), server_pool(*serve_args(name))
    for path, body in requests_for(name):
        # The whole body, usage (token counts) included.
        assert_close(post(remote, path, body), post(local, path, body))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_requests_of_mixed_lengths(
    protocol: str,
    transformer: Callable[[str, str], ServerProcess],
    server_pool: Callable[..., ServerProcess],
) -> None:
    """Requests batched together (and padded to a length bucket) each get their own answer."""
    remote, local = transformer("ner", protocol), server_pool(*serve_args("ner"))
    texts = [" ".join(["Alice visited Paris"] * (1 + i % 5)) for i in range(24)]
    path = "/v1/models/ner:predict"

    def ask(server: ServerProcess, text: str) -> Any:
        return post(server, path, {"instances": [text], "parameters": {"output": "labels"}})

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda t: ask(remote, t), texts))
    want = [ask(local, t) for t in texts]
    assert_close(got, want)
    assert all(r["predictions"][0] for r in got)  # entities were found, not empty answers


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", list(MODELS))
def test_metadata_shows_the_tensors_of_config_pbtxt(
    name: str, protocol: str, transformer: Callable[[str, str], ServerProcess],
    triton: TritonServer, triton_repo: Path,
) -> None:  # fmt: skip
    """What lmserve sends to and expects from Triton, in /v2/models/{name}, is what the
    exported config.pbtxt declares, and what Triton's own metadata shows."""
    with transformer(name, protocol).client() as client:
        metadata = client.get(f"/v2/models/{name}").json()
    params = metadata["parameters"]
    assert params["backend"] == "triton" and params["predictor_model"] == name
    assert params["predictor_protocol"] == protocol
    assert params["predictor"] == (triton.http_host if protocol == "v2" else triton.grpc_url)

    config = config_pbtxt(triton_repo / name / "config.pbtxt")
    assert params["predictor_inputs"] == config["inputs"]
    assert params["predictor_outputs"] == config["outputs"]
    with httpx.Client(base_url=triton.http_url, timeout=10) as client:
        tritons = client.get(f"/v2/models/{name}").json()
    assert params["predictor_inputs"] == tritons["inputs"]
    assert params["predictor_outputs"] == tritons["outputs"]
    if name == "sentiment":  # spelled out once
        assert params["predictor_inputs"] == [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ]
        assert params["predictor_outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 2]}
        ]
    # The protocol's own fields still describe lmserve's V2 model: text in, task output out.
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] and metadata["outputs"][0]["name"] == "output-0"


def test_a_model_other_than_tritons_stops_startup(triton: TritonServer) -> None:
    """The NER tokenizer and config in front of Triton's sentiment model: Triton's metadata
    says logits [-1, 2], lmserve would read [-1, -1, 7]; startup names both, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", "--model_dir", str(model_path("ner")),
         "--model_name", "sentiment", "--predictor_host", triton.grpc_url,
         "--predictor_protocol", "grpc-v2", "--tensor_input_names", TENSORS,
         "--http_port", str(free_port()), "--grpc_port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    message = (
        "returns logits of shape [-1, 2]; lmserve expects [-1, -1, 7] for token_classification"
    )
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def config_pbtxt(path: Path) -> dict[str, list[dict[str, Any]]]:
    """config.pbtxt as Triton reads it (protobuf text format into ModelConfig), in V2 model
    metadata form: datatype without ``TYPE_``, shape = dims behind a -1 batch axis when
    max_batch_size > 0."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config = text_format.Parse(path.read_text(), pb.ModelConfig())
    batch = [-1] if config.max_batch_size > 0 else []

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": pb.DataType.Name(t.data_type).removeprefix("TYPE_"),
                 "shape": [*batch, *t.dims]} for t in items]  # fmt: skip

    return {"inputs": tensors(config.input), "outputs": tensors(config.output)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_triton_errors_are_502_with_tritons_message(protocol: str, triton: TritonServer) -> None:
    """A model Triton does not have: readiness 503, requests 502 carrying Triton's words."""
    host = triton.http_host if protocol == "v2" else triton.grpc_url
    server = start_server(["--model_dir", str(model_path("sentiment")), "--model_name", "ghost",
                           "--predictor_host", host, "--predictor_protocol", protocol],
                          wait_ready=False)  # fmt: skip
    try:
        wait_until_loaded(server, "ghost")
        with server.client() as client:
            assert client.get("/v2/health/ready").status_code == 503
            r = client.post("/v1/models/ghost:predict", json={"instances": ["I love this"]})
        assert r.status_code == 502, r.text
        message = r.json()["error"]
        assert message.startswith("Triton: ") and "ghost" in message, message
    finally:
        assert server.stop() == 0


def wait_until_loaded(server: ServerProcess, name: str, timeout: float = 60) -> None:
    """The model is loaded (its metadata answers) though the predictor may not be ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log()
        try:
            with server.client() as client:
                if client.get(f"/v2/models/{name}").status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(server.log())


def test_readiness_follows_the_predictor(tmp_path: Path) -> None:
    """Ready while Triton is; 503 (and 502 for requests) once it dies; exit 0 all the same."""
    triton = serve_exported(tmp_path, {"sentiment": (model_path("sentiment"),
                                                     "sequence_classification")}, TENSORS.split(","))  # fmt: skip
    server = start_server([*serve_args("sentiment"), "--predictor_host", triton.grpc_url,
                           "--predictor_protocol", "grpc-v2"])  # fmt: skip
    try:
        with server.client() as client:
            body = {"instances": ["I love this"]}
            assert client.post("/v1/models/sentiment:predict", json=body).json() == {
                "predictions": [1]
            }
            triton.kill()
            deadline = time.monotonic() + 15
            while client.get("/v2/health/ready").status_code == 200:
                assert time.monotonic() < deadline, "readiness never noticed Triton was gone"
                time.sleep(0.2)
            assert client.get("/v2/health/live").status_code == 200
            r = client.post("/v1/models/sentiment:predict", json=body)
            assert r.status_code == 502 and "cannot be reached" in r.json()["error"], r.text
    finally:
        triton.kill()
        assert server.stop() == 0


def test_unreachable_predictor_at_startup_is_not_ready() -> None:
    """Kubernetes starts transformer and predictor independently: lmserve waits, not-ready."""
    port = free_port()  # nothing listens there
    server = start_server([*serve_args("sentiment"), "--predictor_host", f"127.0.0.1:{port}"],
                          wait_ready=False)  # fmt: skip
    try:
        wait_until_loaded(server, "sentiment")
        with server.client() as client:
            assert client.get("/v2/health/ready").status_code == 503
            assert client.get("/v2/models/sentiment/ready").status_code == 503
            r = client.post("/v1/models/sentiment:predict", json={"instances": ["x"]})
        assert r.status_code == 502 and f"127.0.0.1:{port}" in r.json()["error"], r.text
    finally:
        assert server.stop() == 0


def test_transformer_mode_never_imports_torch() -> None:
    """Only the tokenizer is loaded: neither torch nor transformers is imported."""
    code = f"""
import sys
from lmserve_core.settings import ServeSettings
from lmserve_core.plan import plan_serving, load_backend_factory
from lmserve_core.backend import LoadRequest
settings = ServeSettings(model_dir={str(model_path("ner"))!r}, model_name="ner",
                         predictor_host="127.0.0.1:{free_port()}", tensor_input_names={TENSORS!r})
plan = plan_serving(settings)
loaded = load_backend_factory(plan.backend)(LoadRequest(settings, plan.source, plan.task, plan.config))
enc = loaded.tokenizer.encode_batch(["Alice lives in Paris"], add_special_tokens=True, max_length=64)
loaded.backend.close()
print(plan.backend, len(enc[0].ids) > 2, "torch" in sys.modules, "transformers" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["triton", "True", "False", "False"], r.stdout + r.stderr


def test_unknown_tensor_name_fails_startup_naming_the_flag() -> None:
    predictor_port, http_port = free_ports(2)
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", *serve_args("sentiment"),
         "--predictor_host", f"127.0.0.1:{predictor_port}", "--http_port", str(http_port),
         "--grpc_port", "0", "--tensor_input_names", "input_ids,pixel_values"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "--tensor_input_names" in r.stderr and "pixel_values" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
