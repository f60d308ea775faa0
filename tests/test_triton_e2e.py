"""A real Triton server on the CPU serves the repository ``lmserve export`` wrote (docs/behaviour.md §6).

Triton is pytriton's bundled ``tritonserver`` with a python-based ``onnxruntime`` backend (see
``_support/triton.py``); it is queried with the official ``tritonclient`` http and grpc
clients, and its logits are checked against PyTorch's on the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from _support.tiny_models import model_path
from _support.triton import TritonServer, serve_exported

pytestmark = pytest.mark.slow

MODEL = "sentiment"
TEXTS = ["I love this", "I hate this"]
INPUTS = ("input_ids", "attention_mask")
ATOL = 1e-4


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("triton-repo")
    server = serve_exported(repo, {MODEL: (model_path(MODEL), "sequence_classification")},
                            list(INPUTS))  # fmt: skip
    try:
        yield server
    finally:
        code = server.stop()
        print(f"\n[triton] stopped with exit code {code}; log {server.log_path}")
    # 0 once every client has closed its connections: Triton unloaded the model cleanly.
    assert code == 0, server.log()[-3000:]


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path(MODEL)))
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUTS}


@pytest.fixture(scope="module")
def torch_model() -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_path(MODEL)), dtype=torch.float32
    )
    return model.eval()


def torch_logits(model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    result: np.ndarray = out.logits.numpy()
    return result


@dataclass
class Api:
    module: ModuleType  # tritonclient.http or tritonclient.grpc
    client: Any


@pytest.fixture(params=[httpclient, grpcclient], ids=["http", "grpc"])
def api(request: pytest.FixtureRequest, triton: TritonServer) -> Iterator[Api]:
    """A client of each protocol, closed after the test: Triton waits for open HTTP
    connections when it stops (``--exit-timeout-secs``)."""
    module = request.param
    if module is httpclient:
        client = httpclient.InferenceServerClient(
            url=triton.http_host, connection_timeout=30, network_timeout=30
        )
    else:
        client = grpcclient.InferenceServerClient(url=triton.grpc_url)
    try:
        yield Api(module, client)
    finally:
        client.close()


def infer(api: Api, batch: dict[str, np.ndarray], input_ids_type: str = "INT64") -> np.ndarray:
    inputs = []
    for name, array in batch.items():
        datatype = input_ids_type if name == "input_ids" else "INT64"
        item = api.module.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array.astype(triton_to_np_dtype(datatype)))
        inputs.append(item)
    outputs = [api.module.InferRequestedOutput("logits")]
    kwargs = {"client_timeout": 30} if api.module is grpcclient else {}
    result = api.client.infer(MODEL, inputs, outputs=outputs, **kwargs)
    logits: np.ndarray = result.as_numpy("logits")
    return logits


def tensors(metadata: Any, key: str) -> list[tuple[str, str]]:
    items = metadata[key] if isinstance(metadata, dict) else getattr(metadata, key)
    return [
        (i["name"], i["datatype"]) if isinstance(i, dict) else (i.name, i.datatype) for i in items
    ]


def test_server_and_model_are_ready(triton: TritonServer, api: Api) -> None:
    client = api.client
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    server = client.get_server_metadata()
    name = server["name"] if isinstance(server, dict) else server.name
    assert name == triton.server_id


def test_model_metadata_lists_the_exported_tensors(api: Api) -> None:
    metadata = api.client.get_model_metadata(MODEL)
    platform = metadata["platform"] if isinstance(metadata, dict) else metadata.platform
    assert platform == "onnxruntime_onnx"
    assert tensors(metadata, "inputs") == [("input_ids", "INT64"), ("attention_mask", "INT64")]
    assert tensors(metadata, "outputs") == [("logits", "FP32")]


def test_logits_match_pytorch(api: Api, torch_model: Any) -> None:
    batch = tokenize(TEXTS)
    logits = infer(api, batch)
    assert logits.dtype == np.float32 and logits.shape == (2, 2)
    assert logits.argmax(axis=1).tolist() == [1, 0]  # POSITIVE, NEGATIVE
    np.testing.assert_allclose(logits, torch_logits(torch_model, batch), rtol=0, atol=ATOL)


def test_concurrent_requests_of_mixed_shapes(triton: TritonServer, torch_model: Any) -> None:
    """The dynamic batcher may merge equal shapes; every answer still belongs to its request."""
    texts = ["I love this", "I hate this", "I love this so much", "hate", "I love this"] * 4
    batches = [tokenize([t]) for t in texts]
    client = httpclient.InferenceServerClient(url=triton.http_host, concurrency=8)
    try:
        pending = []
        for batch in batches:
            inputs = []
            for name, array in batch.items():
                item = httpclient.InferInput(name, list(array.shape), "INT64")
                item.set_data_from_numpy(array)
                inputs.append(item)
            pending.append(client.async_infer(MODEL, inputs))
        for batch, request in zip(batches, pending, strict=True):
            logits = request.get_result(timeout=30).as_numpy("logits")
            want = torch_logits(torch_model, batch)
            np.testing.assert_allclose(logits, want, rtol=0, atol=ATOL)
    finally:
        client.close()


def test_wrong_datatype_is_refused_with_tritons_message(api: Api) -> None:
    with pytest.raises(InferenceServerException) as excinfo:
        infer(api, tokenize(TEXTS), input_ids_type="INT32")
    message = excinfo.value.message()
    assert "input_ids" in message and "INT32" in message and "INT64" in message, message
    assert api.client.is_server_ready()  # a refused request leaves the server serving
