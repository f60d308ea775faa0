"""Transformer mode's configuration checks (the real Triton round trip is in tests/)."""

from __future__ import annotations

import pytest

from lmserve_backend_hf.encoder_info import tensor_inputs
from lmserve_backend_hf.triton import split_predictor_host
from lmserve_core.errors import ConfigurationError


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1:8001", ("127.0.0.1:8001", False)),
        ("triton.default.svc:8000", ("triton.default.svc:8000", False)),
        ("http://triton:8000/", ("triton:8000", False)),
        ("https://triton:443", ("triton:443", True)),
        ("grpc://triton:8001", ("triton:8001", False)),
    ],
)
def test_split_predictor_host(host: str, expected: tuple[str, bool]) -> None:
    assert split_predictor_host(host) == expected


@pytest.mark.parametrize("host", ["triton", "triton:http", ":8000", "http://triton:8000/v2"])
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
