"""A seeded fuzz of Open Inference Protocol (V2) tensors over REST (JSON and the binary
extension) and gRPC (issue 7): datatypes, shapes, element counts, binary lengths, BYTES length
prefixes and text that is not UTF-8. Every answer must be a client error or a success, never a
5xx or gRPC INTERNAL/UNKNOWN, and the server must stay ready with nothing left in flight.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from _support.reliability import assert_idle
from _support.servers import ServerProcess, free_port, start_server
from _support.tiny_models import model_path
from lmserve_protocols.grpc import grpc_predict_v2_pb2 as pb
from lmserve_protocols.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

SEED = 20261128
CASES = 1000  # per transport
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16", "STRING", "", "bytes"]  # fmt: skip
OK_HTTP = {200, 400, 404, 413, 422}
OK_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
         "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
         "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    port = free_port()
    proc = start_server(["--model_dir", str(model_path("sentiment")), "--enable_grpc",
                         "--grpc_port", str(port)])  # fmt: skip
    proc.grpc_port = port  # type: ignore[attr-defined]
    yield proc
    proc.stop()


# --- generators -------------------------------------------------------------------------


def _text(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind in (0, 5):
        return b"the movie was great"
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))  # maybe not UTF-8
    if kind == 2:
        return "".join(
            chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 30))
        ).encode()
    if kind == 3:
        return b""
    return ("word " * rng.randrange(50, 400)).encode()  # longer than the model's 64 tokens


def _datatype(rng: random.Random) -> str:
    # Half the tensors are text, the model's real input, so the fuzz reaches the model too.
    return "BYTES" if rng.random() < 0.5 else rng.choice(DATATYPES)


def _shape(rng: random.Random, n: int) -> list[int]:
    if rng.random() < 0.5:
        return rng.choice([[n], [n, 1]])
    return rng.choice([[n], [n, 1], [1, n], [], [0], [-1], [n + 1], [2**40], [n, 2], [-n - 1]])


def _values(rng: random.Random, datatype: str, count: int) -> list[Any]:
    if datatype in ("BYTES", "STRING", "bytes"):
        return [_text(rng).decode("utf-8", "replace") for _ in range(count)]
    pick = rng.randrange(4)
    if pick == 0:
        return [rng.randrange(-(2**70), 2**70) for _ in range(count)]  # out of range
    if pick == 1:
        return [rng.random() * 1e6 for _ in range(count)]
    if pick == 2:
        return [[1, 2], "x", None, True][: max(count, 1)]
    return [rng.randrange(0, 100) for _ in range(count)]


def _bytes_payload(rng: random.Random, texts: list[bytes]) -> bytes:
    parts = []
    for text in texts:
        declared = len(text) if rng.random() < 0.7 else rng.choice([len(text) + 5, 2**31, 0])
        parts.append(struct.pack("<I", declared) + text)
    body = b"".join(parts)
    return body if rng.random() < 0.8 else body[: rng.randrange(len(body) + 1)]


def _binary(rng: random.Random, datatype: str, count: int) -> bytes:
    if datatype in NUMPY:
        data = np.arange(count).astype(NUMPY[datatype]).tobytes()
        return data if rng.random() < 0.7 else data[: rng.randrange(len(data) + 1)] + b"\x01"
    return _bytes_payload(rng, [_text(rng) for _ in range(count)])


def rest_case(rng: random.Random) -> tuple[dict[str, str], bytes]:
    n = rng.randrange(1, 4)
    datatype = _datatype(rng)
    shape = _shape(rng, n)
    tensor: dict[str, Any] = {"name": rng.choice(["text", "input-0", ""]), "datatype": datatype,
                              "shape": shape}  # fmt: skip
    headers = {"content-type": "application/json"}
    if rng.random() < 0.5:
        tensor["data"] = _values(rng, datatype, n if rng.random() < 0.8 else n + 2)
        return headers, json.dumps({"inputs": [tensor]}).encode()
    payload = _binary(rng, datatype, n)
    size = len(payload) if rng.random() < 0.7 else rng.choice([len(payload) + 3, 0, -1, 2**62])
    tensor["parameters"] = {"binary_data_size": size}
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "output-0",
                         "parameters": {"binary_data": rng.random() < 0.5}}]}).encode()  # fmt: skip
    declared = len(header) if rng.random() < 0.7 else rng.choice([len(header) + 9, 0, 10**12])
    headers["inference-header-content-length"] = (
        str(declared) if rng.random() < 0.9 else rng.choice(["-4", "abc", ""])
    )
    headers["content-type"] = "application/octet-stream"
    return headers, header + payload


def grpc_case(rng: random.Random) -> pb.ModelInferRequest:
    n = rng.randrange(1, 4)
    datatype = _datatype(rng)
    request = pb.ModelInferRequest(model_name=rng.choice(["model"] * 9 + ["ghost"]))
    tensor = request.inputs.add(name="text", datatype=datatype, shape=_shape(rng, n))
    mode = rng.randrange(4)
    if mode == 0:
        request.raw_input_contents.append(_binary(rng, datatype, n))
    elif mode in (1, 3):
        texts = [_text(rng) for _ in range(n if rng.random() < 0.8 else n + 1)]
        tensor.contents.bytes_contents.extend(texts)
    else:
        field = rng.choice(["int_contents", "int64_contents", "fp32_contents", "bool_contents",
                            "uint_contents", "fp64_contents"])  # fmt: skip
        values = [rng.randrange(0, 2) for _ in range(n)]
        getattr(tensor.contents, field).extend(
            [bool(v) for v in values] if field == "bool_contents" else values
        )
    if rng.random() < 0.1:  # a second input, or raw contents with no matching input
        request.raw_input_contents.append(b"\x00" * rng.randrange(9))
    return request


# --- tests ------------------------------------------------------------------------------


def test_rest_v2_fuzz_answers_only_client_errors(server: ServerProcess) -> None:
    rng = random.Random(SEED)
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(CASES):
            headers, body = rest_case(rng)
            r = client.post("/v2/models/model/infer", content=body, headers=headers)
            statuses[r.status_code] += 1
            if r.status_code not in OK_HTTP and len(bad) < 10:
                bad.append(
                    f"{r.status_code} {r.text[:300]}\n  headers={headers} body={body[:300]!r}"
                )
    assert not bad, "\n".join(bad)
    # The fuzz reaches the model as well as the validators.
    assert statuses[200] >= 50 and statuses[400] >= 300, statuses


def test_grpc_v2_fuzz_answers_only_client_errors(server: ServerProcess) -> None:
    rng = random.Random(SEED + 1)
    codes: Counter[str] = Counter()
    bad: list[str] = []
    port = server.grpc_port  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(CASES):
            request = grpc_case(rng)
            try:
                stub.ModelInfer(request, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details()
            codes[code.name] += 1
            if code not in OK_GRPC and len(bad) < 10:
                bad.append(f"{code.name}: {details}\n  {request}")
    assert not bad, "\n".join(bad)
    assert codes["OK"] >= 50 and codes["INVALID_ARGUMENT"] >= 300, codes


def test_the_server_is_ready_and_idle_after_the_fuzz(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert_idle(server)
    r = httpx.post(server.url + "/v1/models/model:predict", json={"instances": ["great movie"]})
    assert r.status_code == 200
    assert "Traceback" not in server.log()
