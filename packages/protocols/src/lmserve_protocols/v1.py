"""KServe V1 data plane schemas (``POST /v1/models/{name}:predict``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class V1PredictRequest(BaseModel):
    """``{"instances": [...]}`` or ``{"inputs": [...]}``, plus optional ``parameters``."""

    model_config = ConfigDict(extra="allow")

    instances: list[Any] | None = None
    inputs: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V1PredictResponse(BaseModel):
    """``{"predictions": [...]}``, one per instance."""

    predictions: list[Any]


class V1ModelStatus(BaseModel):
    name: str
    ready: bool


class V1ModelList(BaseModel):
    models: list[str]


class ServerLiveness(BaseModel):
    """``GET /``: KServe's liveness answer."""

    status: Literal["alive"] = "alive"
