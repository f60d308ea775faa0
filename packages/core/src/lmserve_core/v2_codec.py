"""Open Inference Protocol tensors <-> numpy, JSON and the binary tensor extension.

Binary extension (Triton's ``binary_tensor_data``): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw tensors in input order; an
input in binary carries ``parameters.binary_data_size``. BYTES elements are each a
4-byte little-endian length and the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmserve_core.errors import InvalidInput
from lmserve_protocols.v2 import V2InferResponse, V2ResponseOutput
from lmserve_protocols.wire import json_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
MAX_ELEMENTS = 1 << 26  # refuse absurd shapes before allocating


@dataclass(frozen=True)
class DecodedTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


def element_count(shape: Sequence[Any], name: str) -> int:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(
            f"input {name!r}: shape must be a list of non-negative integers", param="shape"
        )
    count = math.prod(shape) if shape else 1
    if count > MAX_ELEMENTS:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} is too large", param="shape")
    return count


def split_binary_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Separate the JSON header from the binary part (no header: all JSON)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 < n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        payload = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput("request body must be a JSON object")
    return payload, binary


def decode_inputs(inputs: Sequence[Any], binary: bytes) -> list[DecodedTensor]:
    """Decode V2 request inputs (pydantic models or dicts) into numpy arrays."""
    out, offset = [], 0
    for item in inputs:
        spec = item if isinstance(item, dict) else item.model_dump()
        missing = [k for k in ("name", "datatype", "shape") if k not in spec]
        if missing:
            raise InvalidInput(f"an input lacks {', '.join(missing)}", param="inputs")
        name, datatype, shape = spec["name"], spec["datatype"], spec["shape"]
        if datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"input {name!r}: unsupported datatype {datatype!r}", param="datatype"
            )
        count = element_count(shape, name)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body"
                )
            chunk = binary[offset : offset + size]
            offset += size
            data = _from_binary(chunk, datatype, count, name)
        else:
            if spec.get("data") is None:
                raise InvalidInput(f"input {name!r} has no data", param="data")
            data = _from_json(spec["data"], datatype, count, name)
        out.append(DecodedTensor(name, datatype, list(shape), data.reshape(shape)))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return out


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _from_json(data: Any, datatype: str, count: int, name: str) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise InvalidInput(
            f"input {name!r}: shape says {count} elements but data has {len(flat)}", param="shape"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        for i, value in enumerate(flat):
            if not isinstance(value, str):
                raise InvalidInput(f"input {name!r}: BYTES data must be strings", param="data")
            arr[i] = value.encode("utf-8")
        return arr
    dtype = NUMPY_DTYPES[datatype]
    for value in flat:
        ok = (
            isinstance(value, bool)
            if datatype == "BOOL"
            else (isinstance(value, int | float) and not isinstance(value, bool))
        )
        if not ok or (dtype.kind in "iu" and isinstance(value, float) and not value.is_integer()):
            raise InvalidInput(f"input {name!r}: {value!r} is not a valid {datatype}", param="data")
    try:
        # Values that overflow the datatype (1e300 as FP32) are the client's error.
        with np.errstate(over="raise", invalid="raise"):
            return np.asarray(flat, dtype=dtype)
    except (OverflowError, ValueError, FloatingPointError) as exc:
        raise InvalidInput(
            f"input {name!r}: value out of range for {datatype}: {exc}", param="data"
        ) from None


def _from_binary(chunk: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        pos = 0
        for i in range(count):
            if pos + 4 > len(chunk):
                raise InvalidInput(f"input {name!r}: binary BYTES data ends early")
            (n,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + n > len(chunk):
                raise InvalidInput(f"input {name!r}: binary BYTES element runs past its data")
            arr[i] = chunk[pos : pos + n]
            pos += n
        if pos != len(chunk):
            raise InvalidInput(
                f"input {name!r}: {len(chunk) - pos} trailing bytes after {count} elements"
            )
        return arr
    dtype = NUMPY_DTYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: {len(chunk)} bytes of binary data for {count} {datatype} elements "
            f"({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype)


def tensor_to_texts(tensor: DecodedTensor) -> list[str]:
    """The text instances of a BYTES input tensor (any shape, flattened)."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(
            f"input {tensor.name!r} must be BYTES text, not {tensor.datatype}", param="datatype"
        )
    texts = []
    for value in tensor.data.reshape(-1):
        try:
            texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {tensor.name!r} is not valid UTF-8 text") from None
    return texts


def bytes_element(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def encode_binary(datatype: str, data: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in data.reshape(-1):
            raw = bytes_element(value)
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()


def json_data(datatype: str, data: np.ndarray) -> list[Any]:
    """Flattened row-major data for a JSON response (BYTES as str)."""
    flat = data.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return list(flat.tolist())


def encode_response(
    outputs: Sequence[tuple[str, str, np.ndarray]],
    *,
    model_name: str,
    request_id: str | None,
    binary_outputs: set[str] | None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Serialise a V2 response (a :class:`V2InferResponse`, then the binary outputs' bytes).
    Returns (body, JSON header length or None when all JSON)."""
    binary_outputs = binary_outputs or set()
    header_outputs, blobs = [], []
    for name, datatype, data in outputs:
        shape = list(data.shape)
        if name in binary_outputs:
            blob = encode_binary(datatype, data)
            blobs.append(blob)
            output = V2ResponseOutput(name=name, datatype=datatype, shape=shape,
                                      parameters={"binary_data_size": len(blob)})  # fmt: skip
        else:
            output = V2ResponseOutput(
                name=name, datatype=datatype, shape=shape, data=json_data(datatype, data)
            )
        header_outputs.append(output)
    response = V2InferResponse(
        model_name=model_name, id=request_id, parameters=parameters or None, outputs=header_outputs
    )
    head = json_bytes(response)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
