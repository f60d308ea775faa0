"""OpenAPI helpers: routes parse some request bodies by hand (for precise errors) and answer
with already-serialised models (``routes.json_response``, for speed), so FastAPI cannot infer
their schemas; they are declared here, from lmserve-protocols' models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from lmserve_protocols.openai import OpenAIErrorResponse
from lmserve_protocols.v2 import V2Error

_ERRORS = {400: "bad input", 404: "unknown model", 409: "conflicts with the server's state",
           413: "body too large", 429: "overloaded",
           503: "loading, unhealthy or shutting down"}  # fmt: skip


def request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def responses(
    ok: type[BaseModel] | None,
    *,
    openai: bool = False,
    stream: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (400, 404, 413, 429, 503),
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: its 200 body (and, with ``stream``, the server-sent event
    each ``data:`` line carries) and the error body of its protocol family."""
    documented: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        documented[200] = {"model": ok}
        if stream is not None:  # its schema joins the components in ``add_stream_schemas``
            documented[200]["content"] = {
                "text/event-stream": {
                    "schema": {"$ref": f"#/components/schemas/{stream.__name__}"},
                    "description": f"with stream: true, each data: line is a {stream.__name__}, "
                    "then [DONE]",
                }
            }
    error = OpenAIErrorResponse if openai else V2Error
    for code in errors:
        documented[code] = {"model": error, "description": _ERRORS.get(code, "error")}
    return documented


def add_stream_schemas(schema: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put the stream chunk models (and the models they use) into ``components.schemas``:
    FastAPI collects only the models it is given as response models."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in definition.pop("$defs", {}).items():
            components.setdefault(name, nested)
        components.setdefault(model.__name__, definition)
