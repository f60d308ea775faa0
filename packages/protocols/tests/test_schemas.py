"""Wire schemas accept what real clients send and refuse what they must not."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmserve_protocols.openai import EmbeddingRequest, EmbeddingResponse, OpenAIErrorResponse
from lmserve_protocols.v1 import V1PredictRequest
from lmserve_protocols.v2 import V2InferRequest, V2ModelMetadata


def test_v1_accepts_instances_or_inputs_and_extra_keys() -> None:
    assert V1PredictRequest.model_validate({"instances": ["a"]}).instances == ["a"]
    assert V1PredictRequest.model_validate({"inputs": ["a"]}).inputs == ["a"]
    req = V1PredictRequest.model_validate(
        {"instances": ["a"], "parameters": {"output": "labels"}, "x": 1}
    )
    assert req.parameters == {"output": "labels"}


def test_v2_infer_request_shape() -> None:
    body = {
        "id": "42",
        "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
        "outputs": [{"name": "output-0", "parameters": {"binary_data": True}}],
        "parameters": {"binary_data_output": False},
    }
    req = V2InferRequest.model_validate(body)
    assert req.inputs[0].data == ["hi"] and req.outputs and req.outputs[0].name == "output-0"
    # Binary inputs carry no data, only parameters.binary_data_size.
    binary = {
        "inputs": [
            {"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
        ]
    }
    assert V2InferRequest.model_validate(binary).inputs[0].data is None


@pytest.mark.parametrize(
    "body",
    [{"inputs": []}, {}, {"inputs": [{"name": "t"}]}, {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES",
                                                                    "data": [], "unknown": 1}]}],
)  # fmt: skip
def test_v2_infer_request_rejects(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        V2InferRequest.model_validate(body)


def test_embedding_request_input_forms() -> None:
    for value in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert EmbeddingRequest.model_validate({"model": "m", "input": value}).input == value
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": "x", "encoding_format": "hex"})
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": "x", "dimensions": 0})
    # vLLM's rule: a request without 'model' means the served model; 'input' is required.
    assert EmbeddingRequest.model_validate({"input": "x"}).model is None
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m"})


def test_response_models_serialise_as_openai_and_v2_do() -> None:
    resp = EmbeddingResponse.model_validate(
        {
            "data": [{"index": 0, "embedding": [0.5]}],
            "model": "m",
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
    )
    dumped = resp.model_dump()
    assert dumped["object"] == "list" and dumped["data"][0]["object"] == "embedding"
    err = OpenAIErrorResponse.model_validate(
        {"error": {"message": "bad", "type": "invalid_request_error"}}
    )
    assert err.model_dump()["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    meta = V2ModelMetadata(name="m", platform="p", inputs=[], outputs=[])
    assert meta.versions == []
