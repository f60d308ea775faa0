"""How the protocol models go on the wire: fields left out while ``None``, and JSON bytes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


def _is_none(value: object) -> bool:
    return value is None


def omitted_when_none() -> Any:
    """An optional field left out of the JSON while it is ``None`` (rather than sent as
    ``null``): the wire shape KServe and vLLM give such fields."""
    return Field(default=None, exclude_if=_is_none)


def json_bytes(model: BaseModel) -> bytes:
    """``model`` as UTF-8 JSON: ``model_dump_json()`` without its round trip through ``str``."""
    return model.__pydantic_serializer__.to_json(model)
