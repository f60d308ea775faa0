"""The official tritonclient (http, grpc and their aio twins) against lmserve's own V2."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

from _support.servers import ServerProcess, free_port
from _support.tiny_models import model_path
from lmserve_protocols.grpc import grpc_predict_v2_pb2 as pb
from lmserve_protocols.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]


def ports(server: ServerProcess) -> tuple[str, str]:
    http = server.url.removeprefix("http://")
    grpc_port = server.args[server.args.index("--grpc_port") + 1]
    return http, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def sentiment(server_pool: Pool) -> ServerProcess:
    return server_pool(
        "--model_dir",
        str(model_path("sentiment")),
        "--enable_grpc",
        "--grpc_port",
        str(free_port()),
    )


def texts(*items: str) -> np.ndarray:
    return np.array([t.encode() for t in items], dtype=object)


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_sync_clients_classify(sentiment: ServerProcess, module: object) -> None:
    http, grpc_url = ports(sentiment)
    client = module.InferenceServerClient(url=http if module is httpclient else grpc_url)  # type: ignore[attr-defined]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("model")
    meta = client.get_model_metadata("model")
    outputs = (
        meta["outputs"]
        if module is httpclient
        else [{"name": o.name, "datatype": o.datatype} for o in meta.outputs]
    )
    assert outputs[0]["name"] == "output-0" and outputs[0]["datatype"] == "INT64"
    inp = module.InferInput("text", [2], "BYTES")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(texts("I love this", "I hate this"))
    result = client.infer("model", [inp])
    assert result.as_numpy("output-0").tolist() == [1, 0]
    labelled = client.infer("model", [inp], parameters={"output": "labels"})
    (love, _hate) = [json.loads(x) for x in labelled.as_numpy("output-0")]
    assert love[0]["label"] == "POSITIVE"
    client.close()


def test_aio_clients(sentiment: ServerProcess) -> None:
    http, grpc_url = ports(sentiment)

    async def run() -> tuple[list[int], list[int]]:
        h = httpclient_aio.InferenceServerClient(url=http)
        g = grpcclient_aio.InferenceServerClient(url=grpc_url)
        hi = httpclient_aio.InferInput("text", [1], "BYTES")
        hi.set_data_from_numpy(texts("I love this"))
        gi = grpcclient_aio.InferInput("text", [1], "BYTES")
        gi.set_data_from_numpy(texts("I hate this"))
        hr, gr = await asyncio.gather(h.infer("model", [hi]), g.infer("model", [gi]))
        await h.close()
        await g.close()
        return hr.as_numpy("output-0").tolist(), gr.as_numpy("output-0").tolist()

    assert asyncio.run(run()) == ([1], [0])


def test_grpc_bytes_contents_and_errors(sentiment: ServerProcess) -> None:
    _, grpc_url = ports(sentiment)
    with grpc.insecure_channel(grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="model")
        tensor = req.inputs.add(name="text", datatype="BYTES", shape=[2])
        tensor.contents.bytes_contents.extend([b"I love this", b"I hate this"])
        resp = stub.ModelInfer(req)
        assert resp.outputs[0].datatype == "INT64" and list(resp.outputs[0].shape) == [2]
        assert np.frombuffer(resp.raw_output_contents[0], dtype="<i8").tolist() == [1, 0]
        cases = [
            (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
            (pb.ModelInferRequest(model_name="model"), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        wrong = pb.ModelInferRequest(model_name="model")
        wrong.inputs.add(name="x", datatype="INT64", shape=[1]).contents.int64_contents.append(3)
        cases.append((wrong, grpc.StatusCode.INVALID_ARGUMENT))
        mismatch = pb.ModelInferRequest(model_name="model")
        mismatch.inputs.add(name="x", datatype="BYTES", shape=[3]).contents.bytes_contents.append(
            b"a"
        )
        cases.append((mismatch, grpc.StatusCode.INVALID_ARGUMENT))
        raw_bad = pb.ModelInferRequest(
            model_name="model", raw_input_contents=[b"\x09\x00\x00\x00ab"]
        )
        raw_bad.inputs.add(name="x", datatype="BYTES", shape=[1])
        cases.append((raw_bad, grpc.StatusCode.INVALID_ARGUMENT))
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as exc:
                stub.ModelInfer(request)
            assert exc.value.code() == code, exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_tritonclient_sees_http_errors(sentiment: ServerProcess) -> None:
    http, _ = ports(sentiment)
    client = httpclient.InferenceServerClient(url=http)
    inp = httpclient.InferInput("text", [1], "INT64")
    inp.set_data_from_numpy(np.array([1], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="BYTES"):
        client.infer("model", [inp])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")
    client.close()


@pytest.mark.parametrize(
    "name,expected_dtype", [("ner", "INT64"), ("masked_lm", "BYTES"), ("embedding_mean", "FP32")]
)
def test_every_encoder_task_over_grpc(server_pool: Pool, name: str, expected_dtype: str) -> None:
    server = server_pool(
        "--model_dir", str(model_path(name)), "--enable_grpc", "--grpc_port", str(free_port())
    )
    _, grpc_url = ports(server)
    client = grpcclient.InferenceServerClient(url=grpc_url)
    inp = grpcclient.InferInput("text", [1], "BYTES")
    text = "The capital of France is [MASK]." if name == "masked_lm" else "Alice lives in Paris"
    inp.set_data_from_numpy(texts(text))
    out = client.infer("model", [inp]).get_output("output-0")
    assert out.datatype == expected_dtype
    result = client.infer("model", [inp]).as_numpy("output-0")
    if name == "masked_lm":
        assert result.tolist() == [b"paris"]
    elif name == "ner":
        assert result.shape[:2] == (1, 1)
    else:
        assert result.shape == (1, 64) and abs(float(np.linalg.norm(result)) - 1) < 1e-5
    client.close()
