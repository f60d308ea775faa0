"""Transformer mode's configuration checks (the real Triton round trip is in tests/)."""

from __future__ import annotations

import pytest

from lmserve_backend_hf.encoder_info import tensor_inputs
from lmserve_backend_hf.triton import TritonEncoder, _check_metadata, split_predictor_host
from lmserve_backend_hf.triton_contract import (
    TritonTensor,
    describe_tensors,
    expected_output,
    token_inputs,
)
from lmserve_core.encoder import ModelInfo
from lmserve_core.errors import ConfigurationError, PredictorError
from lmserve_core.settings import PredictorProtocol
from lmserve_core.tasks import Task


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1:8001", ("127.0.0.1:8001", False)),
        ("triton.default.svc:8000", ("triton.default.svc:8000", False)),
        ("http://triton:8000/", ("triton:8000", False)),
        ("https://triton:443", ("triton:443", True)),
        ("grpc://triton:8001", ("triton:8001", False)),
        # KServe passes the predictor's Service without a port: 80, as its own transformers do.
        ("minilm-predictor.default", ("minilm-predictor.default:80", False)),
        ("https://triton.example.com", ("triton.example.com:443", True)),
    ],
)
def test_split_predictor_host(host: str, expected: tuple[str, bool]) -> None:
    assert split_predictor_host(host) == expected


@pytest.mark.parametrize("host", ["", "triton:http", ":8000", "http://triton:8000/v2"])
def test_bad_predictor_host_names_the_flag(host: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        split_predictor_host(host)
    assert info.value.param == "predictor_host"


def test_tensor_inputs_default_and_token_type_ids() -> None:
    assert tensor_inputs([], return_token_type_ids=False) == ["input_ids", "attention_mask"]
    assert tensor_inputs([], return_token_type_ids=True) == [
        "input_ids", "attention_mask", "token_type_ids",
    ]  # fmt: skip
    assert tensor_inputs(["input_ids"], return_token_type_ids=True) == ["input_ids"]


@pytest.mark.parametrize(
    "names,fragment",
    [
        (["input_ids", "pixel_values"], "pixel_values"),
        (["attention_mask"], "must include input_ids"),
        (["input_ids", "input_ids"], "twice"),
    ],
)
def test_bad_tensor_inputs(names: list[str], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        tensor_inputs(names, return_token_type_ids=False)
    assert info.value.param == "tensor_input_names"


# --- the tensor contract: what lmserve sends to and expects from Triton -----------------------


def _encoder(output: TritonTensor) -> TritonEncoder:
    return TritonEncoder(url="127.0.0.1:1", protocol=PredictorProtocol.v2, model_name="m",
                         inputs=token_inputs(["input_ids", "attention_mask"]), output=output)  # fmt: skip


def _metadata(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]]):
    """Triton's HTTP model metadata (tritonclient.http returns the JSON as a dict)."""

    def tensors(rows: list[tuple[str, str, list[int]]]) -> list[dict[str, object]]:
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in rows]

    return {"name": "m", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": tensors(inputs), "outputs": tensors(outputs)}  # fmt: skip


class _Client:
    def __init__(self, metadata: object) -> None:
        self.metadata = metadata

    def get_model_metadata(self, name: str) -> object:
        return self.metadata


INPUTS = [("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]


def test_expected_outputs_follow_the_model_config() -> None:
    info = ModelInfo(id2label={0: "NEG", 1: "POS"}, hidden_size=384, vocab_size=30522)
    shapes = {task: expected_output(task, info, "out").shape for task in (
        Task.sequence_classification, Task.token_classification, Task.fill_mask,
        Task.text_embedding)}  # fmt: skip
    assert shapes == {Task.sequence_classification: (-1, 2), Task.token_classification: (-1, -1, 2),
                      Task.fill_mask: (-1, -1, 30522), Task.text_embedding: (-1, -1, 384)}  # fmt: skip
    assert expected_output(Task.text_embedding, ModelInfo(), "x").shape == (-1, -1, -1)


def test_matching_metadata_is_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder(TritonTensor("logits", "FP32", (-1, 2)))
    inputs = [("input_ids", "INT32", [-1, -1]), ("attention_mask", "INT32", [-1, -1])]
    monkeypatch.setattr(
        encoder, "client", lambda: _Client(_metadata(inputs, [("logits", "FP16", [-1, 2])]))
    )
    _check_metadata(encoder, Task.sequence_classification)
    assert [t.as_dict() for t in encoder.inputs] == [
        {"name": "input_ids", "datatype": "INT32", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT32", "shape": [-1, -1]},
    ]
    assert encoder.expected_output == TritonTensor("logits", "FP16", (-1, 2))


@pytest.mark.parametrize(
    "inputs,outputs,fragment",
    [
        # config.pbtxt with a fixed sequence length: lmserve pads to buckets, not to 128.
        ([("input_ids", "INT64", [-1, 128]), ("attention_mask", "INT64", [-1, 128])],
         [("logits", "FP32", [-1, 2])], "[-1, 128]"),
        # max_batch_size 0 and dims [ -1 ]: no batch axis.
        ([("input_ids", "INT64", [-1]), ("attention_mask", "INT64", [-1])],
         [("logits", "FP32", [-1, 2])], "max_batch_size > 0"),
        # Another model behind the same name: 3 classes where config.json says 2.
        (INPUTS, [("logits", "FP32", [-1, 3])], "expects [-1, 2]"),
        (INPUTS, [("logits", "FP32", [-1, -1, 2])], "of shape [-1, -1, 2]"),
        (INPUTS, [("logits", "INT64", [-1, 2])], "floating point"),
    ],
)  # fmt: skip
def test_mismatched_metadata_stops_startup_naming_both_sides(
    inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]],
    fragment: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    encoder = _encoder(TritonTensor("logits", "FP32", (-1, 2)))
    monkeypatch.setattr(encoder, "client", lambda: _Client(_metadata(inputs, outputs)))
    with pytest.raises(ConfigurationError) as info:
        _check_metadata(encoder, Task.sequence_classification)
    assert fragment in info.value.message and "'m'" in info.value.message, info.value.message


def test_an_output_of_another_shape_is_a_predictor_error() -> None:
    encoder = _encoder(TritonTensor("logits", "FP32", (-1, 2)))
    encoder._check_output_shape((4, 2))  # any batch size
    with pytest.raises(PredictorError, match=r"shape \[4, 3\]; lmserve expects \[-1, 2\]"):
        encoder._check_output_shape((4, 3))


def test_describe_tensors_lines_up_with_config_dims() -> None:
    lines = describe_tensors(
        token_inputs(["input_ids"]), [TritonTensor("logits", "FP32", (-1, 2))], 8
    )
    assert lines == [
        "input   input_ids  INT64  [-1, -1]  config.pbtxt dims [ -1 ]",
        "output  logits     FP32   [-1, 2]   config.pbtxt dims [ 2 ]",
    ]
