"""Open Inference Protocol (V2) codecs, as routes/v2.py chains them.

Request side: ``split_binary_body`` -> ``V2InferRequest.model_validate`` -> ``decode_inputs``
-> ``tensor_to_texts`` (what the infer route and ``DataPlane.infer_v2`` do). Response side:
``encode_response`` of an embedding output, as JSON and as the binary tensor extension.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from lmserve_core.v2_codec import decode_inputs, encode_response, split_binary_body, tensor_to_texts
from lmserve_protocols.v2 import V2InferRequest

pytestmark = pytest.mark.benchmark(group="v2-codec", max_time=0.5, min_rounds=5)

BATCH = 32
HIDDEN = 384


def _decode_request(body: bytes, header_length: str | None) -> list[str]:
    payload, binary = split_binary_body(body, header_length)
    request = V2InferRequest.model_validate(payload)
    inputs = decode_inputs(request.inputs, binary)
    return tensor_to_texts(inputs[0])


def test_v2_decode_json_bytes(
    benchmark: Any, prompt_batch: Callable[[int], list[str]], record_rate: Callable[..., None]
) -> None:
    texts = prompt_batch(BATCH)
    body = json.dumps(
        {
            "id": "req-1",
            "inputs": [{"name": "text", "shape": [BATCH], "datatype": "BYTES", "data": texts}],
        }
    ).encode()
    assert benchmark(_decode_request, body, None) == texts
    record_rate(benchmark, BATCH, body_bytes=len(body))


def test_v2_decode_binary_bytes(
    benchmark: Any, prompt_batch: Callable[[int], list[str]], record_rate: Callable[..., None]
) -> None:
    texts = prompt_batch(BATCH)
    blob = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps(
        {
            "id": "req-1",
            "inputs": [
                {
                    "name": "text",
                    "shape": [BATCH],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
        }
    ).encode()
    body = header + blob
    assert benchmark(_decode_request, body, str(len(header))) == texts
    record_rate(benchmark, BATCH, body_bytes=len(body))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_v2_encode_fp32_output(
    benchmark: Any, record_rate: Callable[..., None], binary: bool
) -> None:
    data = np.random.default_rng(0).standard_normal((BATCH, HIDDEN), dtype=np.float32)
    outputs = [("output-0", "FP32", data)]
    body, header_length = benchmark(
        encode_response,
        outputs,
        model_name="all-minilm-l6-v2",
        request_id="req-1",
        binary_outputs={"output-0"} if binary else None,
    )
    assert (header_length is not None) == binary
    record_rate(benchmark, BATCH, body_bytes=len(body))
