"""OpenAPI helpers for routes that parse their bodies by hand."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }
