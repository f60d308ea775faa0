"""``--backend onnx``: encoders exported once (cached), run in-process by ONNX Runtime, with
the same answers as the PyTorch backend for every encoder task."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _support.encoder_parity import MODELS, assert_close, post, requests_for, serve_args
from _support.servers import ServerProcess, start_server
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

# Exports are cached by the model files' names, sizes and mtimes, the task, the inputs and the
# exporter's source: a repository-local cache keeps reruns fast and stays correct.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "lmserve-test-cache"


@pytest.fixture(scope="module")
def onnx_server() -> Iterator[Callable[[str], ServerProcess]]:
    servers: dict[str, ServerProcess] = {}

    def get(name: str) -> ServerProcess:
        if name not in servers:
            servers[name] = start_server([*serve_args(name), "--backend", "onnx"],
                                         env={"LMSERVE_CACHE_DIR": str(CACHE_DIR)})  # fmt: skip
        return servers[name]

    yield get
    for server in servers.values():
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize("name", list(MODELS))
def test_same_answers_as_pytorch(
    name: str,
    onnx_server: Callable[[str], ServerProcess],
    server_pool: Callable[..., ServerProcess],
) -> None:
    remote, local = onnx_server(name), server_pool(*serve_args(name))
    for path, body in requests_for(name):
        assert_close(post(remote, path, body), post(local, path, body))
    with remote.client() as client:
        params = client.get(f"/v2/models/{name}").json()["parameters"]
    assert params["backend"] == "onnx" and params["providers"] == ["CPUExecutionProvider"]
    assert Path(params["onnx"]).is_file() and Path(params["onnx"]).is_relative_to(CACHE_DIR)


def test_a_cached_export_loads_without_torch(onnx_server: Callable[[str], ServerProcess]) -> None:
    """Once exported, starting again reads the cached graph: no export, no torch import."""
    onnx_server("sentiment")  # makes sure the export is in the cache
    code = f"""
import logging, os, sys
logging.basicConfig(level=logging.INFO)
os.environ["LMSERVE_CACHE_DIR"] = {str(CACHE_DIR)!r}
from lmserve_core.settings import ServeSettings
from lmserve_core.plan import plan_serving, load_backend_factory
from lmserve_core.backend import LoadRequest
import numpy as np
settings = ServeSettings(model_dir={str(model_path("sentiment"))!r}, backend="onnx")
plan = plan_serving(settings)
loaded = load_backend_factory(plan.backend)(LoadRequest(settings, plan.source, plan.task, plan.config))
ids = np.array([[2, 5, 6, 3]], dtype=np.int64)
logits = loaded.backend.forward({{"input_ids": ids, "attention_mask": np.ones_like(ids)}})
print(plan.backend, logits.shape, "torch" in sys.modules, "transformers" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["onnx", "(1,", "2)", "False", "False"], r.stdout + r.stderr
    assert "from the cache" in r.stderr


def test_generative_models_are_refused() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", "--model_dir", str(model_path("llama")),
         "--backend", "onnx"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "--backend" in r.stderr and "generative" in r.stderr, r.stderr
