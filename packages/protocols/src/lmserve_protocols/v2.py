"""Open Inference Protocol (KServe V2) REST schemas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmserve_protocols.wire import omitted_when_none

V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
]  # fmt: skip


class V2RequestInput(BaseModel):
    """One input tensor: name, shape, datatype and (in JSON) its data, row-major."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    # Absent when the tensor travels in the binary extension.
    data: Any = None


class V2RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``: at least one input tensor; unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2RequestInput] = Field(min_length=1)
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    """One output tensor of an inference response: ``data`` in JSON, or
    ``parameters.binary_data_size`` bytes after the JSON (the binary tensor extension)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = omitted_when_none()
    data: list[Any] | None = omitted_when_none()


class V2InferResponse(BaseModel):
    """The answer to ``/v2/models/{name}/infer``: the output tensors."""

    model_name: str
    model_version: str | None = omitted_when_none()
    id: str | None = omitted_when_none()
    parameters: dict[str, Any] | None = omitted_when_none()
    outputs: list[V2ResponseOutput]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``: the tensors a model takes and returns."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] | None = None


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ReadyResponse(BaseModel):
    """``GET /v2/models/{name}/ready``."""

    name: str
    ready: bool


class V2ServerReady(BaseModel):
    """``GET /v2/health/ready``."""

    ready: bool


class V2LiveResponse(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class V2Error(BaseModel):
    """The error body of every KServe route, V1 and V2: ``{"error": "message"}``."""

    error: str
