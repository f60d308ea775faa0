"""lmserve_core.v2_codec: V2 JSON tensors and the binary tensor extension."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import numpy as np
import pytest

from lmserve_core import InvalidInput
from lmserve_core.v2_codec import (
    HEADER_LENGTH,
    MAX_ELEMENTS,
    NUMPY_DTYPES,
    DecodedTensor,
    decode_inputs,
    encode_binary,
    encode_response,
    split_binary_body,
    tensor_to_texts,
)
from lmserve_protocols.v2 import V2InferRequest


def _input(
    name: str, datatype: str, shape: list[int], data: Any = None, **params: Any
) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        spec["data"] = data
    if params:
        spec["parameters"] = params
    return spec


def _bytes_blob(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# --- JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False, True], np.bool_),
        ("UINT8", [0, 7, 255], np.uint8),
        ("UINT16", [0, 1, 65535], np.uint16),
        ("UINT32", [0, 1, 4294967295], np.uint32),
        ("UINT64", [0, 1, 18446744073709551615], np.uint64),
        ("INT8", [-128, 0, 127], np.int8),
        ("INT16", [-32768, 0, 32767], np.int16),
        ("INT32", [-2147483648, 0, 2147483647], np.int32),
        ("INT64", [-9223372036854775808, 0, 9223372036854775807], np.int64),
        ("FP16", [0.5, -1.25, 2048.0], np.float16),
        ("FP32", [0.5, -1.25, 3.0e38], np.float32),
        ("FP64", [0.1, -1e300, 2.5], np.float64),
    ],
)
def test_json_decode_numeric_datatypes(datatype: str, data: list[Any], dtype: type) -> None:
    (t,) = decode_inputs([_input("x", datatype, [3], data)], b"")
    assert isinstance(t, DecodedTensor)
    assert (t.name, t.datatype, t.shape) == ("x", datatype, [3])
    assert t.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(t.data, np.asarray(data, dtype=dtype))


def test_json_decode_bytes_from_strings() -> None:
    (t,) = decode_inputs([_input("text", "BYTES", [2], ["hello", "héllo ✓"])], b"")
    assert t.data.dtype == object
    assert list(t.data) == [b"hello", "héllo ✓".encode()]
    assert tensor_to_texts(t) == ["hello", "héllo ✓"]


def test_json_decode_nested_data_lists_row_major() -> None:
    (t,) = decode_inputs([_input("x", "INT32", [2, 3], [[1, 2, 3], [4, 5, 6]])], b"")
    assert t.data.shape == (2, 3)
    np.testing.assert_array_equal(t.data, [[1, 2, 3], [4, 5, 6]])
    (t,) = decode_inputs([_input("x", "FP32", [2, 1, 2], [[[1.0, 2.0]], [[3.0, 4.0]]])], b"")
    assert t.data.shape == (2, 1, 2)
    assert t.data[1, 0, 1] == 4.0
    # Flat data with a multi-dimensional shape is row-major too.
    (t,) = decode_inputs([_input("x", "INT64", [3, 2], [1, 2, 3, 4, 5, 6])], b"")
    np.testing.assert_array_equal(t.data[:, 1], [2, 4, 6])
    (t,) = decode_inputs([_input("s", "BYTES", [2, 1], [["a"], ["b"]])], b"")
    assert t.data.shape == (2, 1) and t.data[1, 0] == b"b"


def test_json_decode_scalar_and_empty_shapes() -> None:
    (t,) = decode_inputs([_input("x", "INT64", [], [7])], b"")
    assert t.data.shape == () and int(t.data) == 7
    (t,) = decode_inputs([_input("x", "FP32", [0, 4], [])], b"")
    assert t.data.shape == (0, 4)


def test_json_integral_floats_are_accepted_for_integers() -> None:
    (t,) = decode_inputs([_input("x", "INT64", [2], [3.0, -2.0])], b"")
    np.testing.assert_array_equal(t.data, [3, -2])


def test_decode_accepts_pydantic_inputs() -> None:
    req = V2InferRequest.model_validate({"inputs": [_input("text", "BYTES", [1], ["hi"])]})
    (t,) = decode_inputs(req.inputs, b"")
    assert tensor_to_texts(t) == ["hi"]


@pytest.mark.parametrize(
    ("shape", "data"),
    [([3], [1, 2]), ([2, 2], [1, 2, 3]), ([1], [[1, 2]]), ([2, 3], [[1, 2, 3]]), ([], [1, 2])],
)
def test_json_element_count_mismatch(shape: list[int], data: list[Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([_input("x", "INT64", shape, data)], b"")
    assert info.value.param == "shape"
    assert "'x'" in info.value.message


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("INT64", "1"),  # strings in numeric tensors
        ("INT64", 1.5),  # fractions in integer tensors
        ("INT32", -0.5),
        ("UINT8", 1e-3),
        ("INT64", True),  # bools are not numbers here
        ("FP32", False),
        ("FP32", "1.0"),
        ("FP32", None),
        ("INT64", {"a": 1}),
        ("BOOL", 1),  # numbers are not bools
        ("BOOL", "true"),
        ("INT64", float("nan")),
        ("INT64", float("inf")),
        ("UINT8", 256),  # out of range
        ("UINT8", -1),
        ("UINT32", -1),
        ("INT8", 128),
        ("INT16", 40000.0),
        ("INT64", 2**63),
        ("UINT64", 2**64),
        ("FP64", 10**400),
        ("BYTES", 1),  # BYTES must come as strings
        ("BYTES", None),
        ("BYTES", True),
    ],
)
def test_json_wrong_element_types(datatype: str, value: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([_input("x", datatype, [2], [value, value])], b"")
    assert info.value.param == "data"


@pytest.mark.parametrize("datatype", ["BF16", "STRING", "fp32", "INT128", ""])
def test_unsupported_datatype(datatype: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([_input("x", datatype, [1], [1])], b"")
    assert info.value.param == "datatype"


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.0], [True], "3", None, [[1]]])
def test_bad_shapes(shape: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([_input("x", "INT64", shape, [1])], b"")
    assert info.value.param == "shape"


def test_absurd_shape_is_refused_before_allocating() -> None:
    with pytest.raises(InvalidInput, match="too large") as info:
        decode_inputs([_input("x", "FP32", [MAX_ELEMENTS, 2], [0.0])], b"")
    assert info.value.param == "shape"


def test_missing_data() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_inputs([_input("x", "INT64", [1])], b"")
    assert info.value.param == "data"


# --- split_binary_body --------------------------------------------------------------


def test_split_without_header_is_all_json() -> None:
    payload, binary = split_binary_body(b'{"inputs": []}', None)
    assert payload == {"inputs": []}
    assert binary == b""


def test_split_with_header_length() -> None:
    head = json.dumps({"inputs": [1]}).encode()
    payload, binary = split_binary_body(head + b"\x01\x02\x03", str(len(head)))
    assert payload == {"inputs": [1]}
    assert binary == b"\x01\x02\x03"
    # A header length equal to the body is all JSON.
    payload, binary = split_binary_body(head, str(len(head)))
    assert payload == {"inputs": [1]} and binary == b""


@pytest.mark.parametrize("header", ["abc", "", "1.5", "0", "-3", "999", "0x10"])
def test_split_bad_header_length(header: str) -> None:
    with pytest.raises(InvalidInput):
        split_binary_body(b'{"a": 1}' + b"\x00" * 8, header)


def test_split_header_length_cutting_the_json() -> None:
    with pytest.raises(InvalidInput, match="not valid JSON"):
        split_binary_body(b'{"a": 1}\x00\x00', "4")


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b""])
def test_split_body_must_be_a_json_object(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        split_binary_body(body, None)


def test_header_length_name() -> None:
    assert HEADER_LENGTH == "Inference-Header-Content-Length"


# --- binary inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "fmt", "values"),
    [
        ("INT32", "<3i", [1, -2, 2147483647]),
        ("INT64", "<3q", [1, -2, 2**62]),
        ("UINT16", "<3H", [1, 2, 65535]),
        ("UINT64", "<3Q", [1, 2, 2**64 - 1]),
        ("INT8", "<3b", [-1, 0, 1]),
        ("FP32", "<3f", [1.5, -2.25, 0.0]),
        ("FP64", "<3d", [0.1, -1e300, 2.5]),
        ("FP16", "<3e", [1.5, -2.0, 65504.0]),
    ],
)
def test_binary_numeric_is_little_endian(datatype: str, fmt: str, values: list[Any]) -> None:
    blob = struct.pack(fmt, *values)
    (t,) = decode_inputs([_input("x", datatype, [3], binary_data_size=len(blob))], blob)
    assert t.data.dtype == NUMPY_DTYPES[datatype]
    assert t.data.tolist() == values


def test_binary_big_endian_bytes_are_read_as_little_endian() -> None:
    blob = struct.pack(">i", 1)
    (t,) = decode_inputs([_input("x", "INT32", [1], binary_data_size=4)], blob)
    assert int(t.data[0]) == 1 << 24


def test_binary_bool_and_shape() -> None:
    (t,) = decode_inputs([_input("x", "BOOL", [2, 2], binary_data_size=4)], b"\x01\x00\x00\x01")
    assert t.data.tolist() == [[True, False], [False, True]]


def test_binary_bytes_with_length_prefixes() -> None:
    blob = _bytes_blob(b"hello", b"", "é✓".encode(), b"\x00\xff")
    (t,) = decode_inputs([_input("s", "BYTES", [2, 2], binary_data_size=len(blob))], blob)
    assert t.data.shape == (2, 2)
    assert t.data.reshape(-1).tolist() == [b"hello", b"", "é✓".encode(), b"\x00\xff"]


def test_binary_and_json_inputs_mixed_in_order() -> None:
    a = struct.pack("<2i", 5, 6)
    b = _bytes_blob(b"xy")
    inputs = [
        _input("a", "INT32", [2], binary_data_size=len(a)),
        _input("j", "FP32", [1], [0.5]),
        _input("b", "BYTES", [1], binary_data_size=len(b)),
    ]
    ta, tj, tb = decode_inputs(inputs, a + b)
    assert ta.data.tolist() == [5, 6]
    assert tj.data.tolist() == [0.5]
    assert tb.data.tolist() == [b"xy"]


def test_binary_zero_size_tensor() -> None:
    (t,) = decode_inputs([_input("x", "FP32", [0], binary_data_size=0)], b"")
    assert t.data.shape == (0,)


@pytest.mark.parametrize(
    ("datatype", "shape", "blob"),
    [
        ("INT32", [3], struct.pack("<2i", 1, 2)),  # too short
        ("INT32", [1], struct.pack("<2i", 1, 2)),  # too long
        ("FP64", [1], b"\x00" * 7),
        ("FP16", [2], b"\x00" * 3),
    ],
)
def test_binary_numeric_size_must_match_the_shape(
    datatype: str, shape: list[int], blob: bytes
) -> None:
    with pytest.raises(InvalidInput):
        decode_inputs([_input("x", datatype, shape, binary_data_size=len(blob))], blob)


@pytest.mark.parametrize(
    ("count", "blob"),
    [
        (2, _bytes_blob(b"abc")),  # second element missing entirely
        (1, b"\x03\x00"),  # length prefix cut short
        (1, struct.pack("<I", 10) + b"abc"),  # element runs past its data
        (1, _bytes_blob(b"abc") + b"z"),  # trailing byte
        (1, _bytes_blob(b"abc", b"d")),  # a trailing whole element
    ],
)
def test_binary_bytes_malformed(count: int, blob: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_inputs([_input("s", "BYTES", [count], binary_data_size=len(blob))], blob)


def test_binary_data_size_running_past_the_body() -> None:
    with pytest.raises(InvalidInput, match="past the end"):
        decode_inputs([_input("x", "INT32", [2], binary_data_size=8)], b"\x00" * 4)


def test_binary_data_size_past_the_body_for_a_later_input() -> None:
    inputs = [
        _input("a", "INT32", [1], binary_data_size=4),
        _input("b", "INT32", [1], binary_data_size=4),
    ]
    with pytest.raises(InvalidInput):
        decode_inputs(inputs, b"\x00" * 6)


@pytest.mark.parametrize("size", [-1, "4", 4.0, True, None])
def test_binary_data_size_must_be_a_non_negative_integer(size: Any) -> None:
    spec = _input("x", "INT32", [1])
    spec["parameters"] = {"binary_data_size": size}
    if size is None:
        # No size means JSON data, which this input lacks.
        with pytest.raises(InvalidInput, match="no data"):
            decode_inputs([spec], b"\x00" * 4)
        return
    with pytest.raises(InvalidInput, match="binary_data_size"):
        decode_inputs([spec], b"\x00" * 4)


def test_leftover_binary_bytes_belong_to_no_input() -> None:
    with pytest.raises(InvalidInput, match="belong to no input"):
        decode_inputs([_input("x", "INT32", [1], binary_data_size=4)], b"\x00" * 5)
    with pytest.raises(InvalidInput, match="belong to no input"):
        decode_inputs([_input("x", "INT32", [1], [1])], b"\x00")


def test_full_binary_request_through_split() -> None:
    texts = _bytes_blob(b"hello world", b"bye")
    head = json.dumps(
        {"inputs": [_input("text", "BYTES", [2], binary_data_size=len(texts))]}
    ).encode()
    payload, binary = split_binary_body(head + texts, str(len(head)))
    (t,) = decode_inputs(payload["inputs"], binary)
    assert tensor_to_texts(t) == ["hello world", "bye"]


def test_tensor_to_texts_errors() -> None:
    numeric = DecodedTensor("x", "INT64", [1], np.array([1]))
    with pytest.raises(InvalidInput) as info:
        tensor_to_texts(numeric)
    assert info.value.param == "datatype"
    bad = np.empty(1, dtype=object)
    bad[0] = b"\xff\xfe"
    with pytest.raises(InvalidInput, match="UTF-8"):
        tensor_to_texts(DecodedTensor("s", "BYTES", [1], bad))


def test_tensor_to_texts_flattens() -> None:
    data = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)
    assert tensor_to_texts(DecodedTensor("s", "BYTES", [2, 2], data)) == ["a", "b", "c", "d"]


# --- encode_response ----------------------------------------------------------------


def _str_array(values: list[str], shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape) if shape else arr


def test_encode_response_all_json() -> None:
    outputs = [
        ("output-0", "INT64", np.array([[1, 2, 3]], dtype=np.int64)),
        ("labels", "BYTES", _str_array(["a", "ü"])),
        ("scores", "FP32", np.array([0.5, 0.25], dtype=np.float32)),
    ]
    body, header_length = encode_response(
        outputs, model_name="m", request_id="r1", binary_outputs=None, parameters={"k": 1}
    )
    assert header_length is None
    doc = json.loads(body)
    assert doc["model_name"] == "m"
    assert doc["id"] == "r1"
    assert doc["parameters"] == {"k": 1}
    assert doc["outputs"] == [
        {"name": "output-0", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["a", "ü"]},
        {"name": "scores", "datatype": "FP32", "shape": [2], "data": [0.5, 0.25]},
    ]


def test_encode_response_without_id_or_parameters() -> None:
    body, _ = encode_response(
        [("o", "BOOL", np.array([True]))], model_name="m", request_id=None, binary_outputs=set()
    )
    doc = json.loads(body)
    assert "id" not in doc and "parameters" not in doc
    assert doc["outputs"][0]["data"] == [True]


def test_encode_response_binary_outputs() -> None:
    ints = np.array([[1, -2], [3, 4]], dtype=np.int64)
    strings = _str_array(["hi", "", "✓"])
    floats = np.array([1.5], dtype=np.float32)
    body, header_length = encode_response(
        [("ints", "INT64", ints), ("strings", "BYTES", strings), ("floats", "FP32", floats)],
        model_name="m",
        request_id=None,
        binary_outputs={"ints", "strings"},
    )
    assert header_length is not None
    header = json.loads(body[:header_length])
    blobs = body[header_length:]
    ints_entry, str_entry, float_entry = header["outputs"]
    assert "data" not in ints_entry and "data" not in str_entry
    assert ints_entry["parameters"] == {"binary_data_size": 32}
    assert str_entry["parameters"] == {"binary_data_size": 4 * 3 + 2 + 0 + 3}
    assert float_entry["data"] == [1.5]
    assert len(blobs) == 32 + 4 * 3 + 5
    # Raw layout: little-endian int64s, then length-prefixed strings.
    assert blobs[:32] == struct.pack("<4q", 1, -2, 3, 4)
    assert blobs[32:] == _bytes_blob(b"hi", b"", "✓".encode())
    # And what we encode, we decode.
    payload, binary = split_binary_body(body, str(header_length))
    ti, ts, tf = decode_inputs(payload["outputs"], binary)
    np.testing.assert_array_equal(ti.data, ints)
    assert ts.data.tolist() == [b"hi", b"", "✓".encode()]
    np.testing.assert_array_equal(tf.data, floats)


def test_encode_binary_is_little_endian_whatever_the_input_order() -> None:
    big = np.array([1, 2], dtype=">i4")
    assert encode_binary("INT32", big) == struct.pack("<2i", 1, 2)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert encode_binary("INT16", fortran) == struct.pack("<6h", 0, 1, 2, 3, 4, 5)


def _random_tensor(rng: random.Random, nprng: np.random.Generator, datatype: str) -> np.ndarray:
    shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        alphabet = 'ab yzé✓\n"\\\x00'
        values = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(count)
        ]
        return _str_array(values, shape) if shape else _str_array(values).reshape(())
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        return nprng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return nprng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (nprng.standard_normal(size=shape) * 1000).astype(dtype)


def test_random_round_trip_json_and_binary() -> None:
    rng = random.Random(20240607)
    nprng = np.random.default_rng(20240607)
    datatypes = sorted(NUMPY_DTYPES)
    for _ in range(300):
        outputs = []
        for k in range(rng.randint(1, 4)):
            datatype = rng.choice(datatypes)
            outputs.append((f"out{k}", datatype, _random_tensor(rng, nprng, datatype)))
        binary = {name for name, _, _ in outputs if rng.random() < 0.5}
        body, header_length = encode_response(
            outputs, model_name="m", request_id="id", binary_outputs=binary
        )
        assert (header_length is None) == (not binary)
        payload, blob = split_binary_body(
            body, None if header_length is None else str(header_length)
        )
        decoded = decode_inputs(payload["outputs"], blob)
        assert len(decoded) == len(outputs)
        for (name, datatype, data), tensor in zip(outputs, decoded, strict=True):
            assert (tensor.name, tensor.datatype) == (name, datatype)
            assert tensor.shape == list(data.shape)
            assert tensor.data.shape == data.shape
            if datatype == "BYTES":
                expected = [v.encode("utf-8") for v in data.reshape(-1)]
                assert tensor.data.reshape(-1).tolist() == expected
            else:
                assert tensor.data.dtype == data.dtype
                np.testing.assert_array_equal(tensor.data, data)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1e300]},
        {"name": "x", "shape": [1], "datatype": "INT8", "data": [300]},
        {"name": "x", "shape": [1], "datatype": "UINT8", "data": [-1]},
        {"shape": [1], "data": [1]},
    ],
)
def test_out_of_range_values_and_missing_keys_are_invalid_input(spec: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        decode_inputs([spec], b"")
