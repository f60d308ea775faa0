"""A request's output constraint: ``response_format`` and vLLM's ``structured_outputs``.

vLLM's rule: ``response_format`` (json_object, json_schema, structural_tag) overrides the
constraint of ``structured_outputs`` and keeps its options (whitespace and
additionalProperties); ``{"type": "text"}`` asks for nothing. Whether a constraint compiles is
the backend's to say (``GenerativeBackend.check_structured_output``); what can be checked
without a grammar engine is checked here.
"""

from __future__ import annotations

import json
from typing import Any

from lmserve_core.errors import InvalidInput
from lmserve_core.generation.params import StructuredKind, StructuredOutput
from lmserve_protocols.openai import ResponseFormat, StructuredOutputsParams

# Bigger schemas and grammars are refused before anything compiles them: compile time grows
# with their size, and a request must not hold a worker for long.
MAX_SPEC_CHARS = 64 * 1024


def _constraint(params: StructuredOutputsParams) -> tuple[StructuredKind, str] | None:
    kinds: list[tuple[StructuredKind, str]] = []
    if params.json_ is not None:
        schema = params.json_
        kinds.append(("json", schema if isinstance(schema, str) else json.dumps(schema)))
    if params.regex is not None:
        kinds.append(("regex", params.regex))
    if params.choice is not None:
        if not params.choice:
            raise InvalidInput(
                "structured_outputs.choice must not be empty", param="structured_outputs"
            )
        kinds.append(("choice", json.dumps(params.choice)))
    if params.grammar is not None:
        kinds.append(("grammar", params.grammar))
    if params.json_object:
        kinds.append(("json_object", ""))
    if params.structural_tag is not None:
        kinds.append(("structural_tag", params.structural_tag))
    if len(kinds) > 1:
        raise InvalidInput(
            "You can only use one kind of structured outputs constraint but multiple are "
            f"specified: {', '.join(k for k, _ in kinds)}",
            param="structured_outputs",
        )
    return kinds[0] if kinds else None


def _from_response_format(fmt: ResponseFormat) -> tuple[StructuredKind, str] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json_object", ""
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise InvalidInput(
                "When response_format type is 'json_schema', the 'json_schema.schema' field "
                "must be provided.",
                param="response_format",
            )
        return "json", json.dumps(fmt.json_schema.json_schema)
    # structural_tag: the whole object is the tag (vLLM passes it on as JSON).
    body: dict[str, Any] = fmt.model_dump(exclude_none=True)
    if "format" not in body and "structures" not in body:
        raise InvalidInput(
            "Invalid response_format structural_tag specification: it needs 'format' (or "
            "the legacy 'structures' and 'triggers').",
            param="response_format",
        )
    return "structural_tag", json.dumps(body)


def structured_output(
    response_format: ResponseFormat | None, params: StructuredOutputsParams | None
) -> tuple[StructuredOutput | None, str]:
    """The request's constraint, and the field it came from (for errors)."""
    chosen = _constraint(params) if params is not None else None
    source = "structured_outputs"
    if response_format is not None:
        from_format = _from_response_format(response_format)
        if from_format is not None:
            chosen, source = from_format, "response_format"
    if chosen is None:
        return None, source
    kind, value = chosen
    if len(value) > MAX_SPEC_CHARS:
        raise InvalidInput(
            f"the {kind} constraint is {len(value)} characters; at most {MAX_SPEC_CHARS} are "
            "allowed",
            param=source,
        )
    if kind in ("json", "structural_tag"):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"the {kind} constraint is not valid JSON: {exc}", param=source
            ) from None
    options = params or StructuredOutputsParams()
    if options.whitespace_pattern is not None:
        # Only vLLM's outlines engine reads it; xgrammar (both backends here) has no equivalent.
        raise InvalidInput(
            "structured_outputs.whitespace_pattern is not supported (xgrammar, the grammar "
            "engine here, has no equivalent); use disable_any_whitespace",
            param="structured_outputs",
        )
    spec = StructuredOutput(
        kind=kind,
        value=value,
        disable_any_whitespace=options.disable_any_whitespace,
        disable_additional_properties=options.disable_additional_properties,
        whitespace_pattern=options.whitespace_pattern,
    )
    return spec, source
