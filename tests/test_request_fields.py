"""Nothing accepted and ignored: every field of vLLM's own chat and completion requests (the
vLLM installed with the tests) is declared by lmserve's request model (implemented) or listed
in lmserve_core.generation.request_fields (refused with a 400 unless it has vLLM's default)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from lmserve_core.generation.request_fields import NOT_IMPLEMENTED
from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest, StreamOptions


def _vllm_models() -> dict[str, tuple[type[BaseModel], type[BaseModel]]]:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionRequest as VllmChat,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    return {
        "chat": (VllmChat, ChatCompletionRequest),
        "completion": (VllmCompletion, CompletionRequest),
    }


def _default(info: Any) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_vllm_field_is_implemented_or_refused(kind: str) -> None:
    vllm_model, ours = _vllm_models()[kind]
    unaccounted = [
        name for name in vllm_model.model_fields
        if name not in ours.model_fields and name not in NOT_IMPLEMENTED[kind]
    ]  # fmt: skip
    assert unaccounted == [], f"vLLM {kind} fields neither implemented nor refused"
    # A refused field is refused only away from vLLM's own default.
    for name, default in NOT_IMPLEMENTED[kind].items():
        if name in vllm_model.model_fields:
            assert _default(vllm_model.model_fields[name]) == default, name
    stale = [n for n in NOT_IMPLEMENTED[kind] if n not in vllm_model.model_fields]
    assert stale == [], "listed as vLLM fields but vLLM has no such field"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_implemented_fields_keep_vllms_defaults(kind: str) -> None:
    vllm_model, ours = _vllm_models()[kind]
    # Where lmserve follows OpenAI or validates tighter, the meaning of "unset" is still vLLM's.
    different = {"max_tokens", "n", "stop", "stop_token_ids", "top_logprobs", "logprobs",
                 "stream", "model", "messages", "prompt", "request_id", "tool_choice",
                 "response_format", "parallel_tool_calls"}  # fmt: skip
    for name, info in ours.model_fields.items():
        if name in vllm_model.model_fields and name not in different:
            assert info.default == _default(vllm_model.model_fields[name]), name


def test_stream_options_cover_vllms() -> None:
    from vllm.entrypoints.generate.base.protocol import StreamOptions as VllmStreamOptions

    assert set(VllmStreamOptions.model_fields) <= set(StreamOptions.model_fields)


# --- /tokenize and /detokenize ------------------------------------------------------------


def _tokenize_models() -> dict[str, tuple[type[BaseModel], type[BaseModel]]]:
    from vllm.entrypoints.serve.tokenize import protocol as vllm_tokenize

    from lmserve_protocols import tokenize as ours

    return {
        "tokenize_completion": (
            vllm_tokenize.TokenizeCompletionRequest,
            ours.TokenizeCompletionRequest,
        ),
        "tokenize_chat": (vllm_tokenize.TokenizeChatRequest, ours.TokenizeChatRequest),
        "detokenize": (vllm_tokenize.DetokenizeRequest, ours.DetokenizeRequest),
    }


@pytest.mark.parametrize("kind", ["tokenize_completion", "tokenize_chat", "detokenize"])
def test_every_vllm_tokenize_field_is_implemented_or_refused(kind: str) -> None:
    vllm_model, ours = _tokenize_models()[kind]
    unaccounted = [
        name for name in vllm_model.model_fields
        if name not in ours.model_fields and name not in NOT_IMPLEMENTED[kind]
    ]  # fmt: skip
    assert unaccounted == [], f"vLLM {kind} fields neither implemented nor refused"
    for name, default in NOT_IMPLEMENTED[kind].items():
        assert name in vllm_model.model_fields, f"{name}: listed, but vLLM has no such field"
        assert _default(vllm_model.model_fields[name]) == default, name
    # Every implemented field has vLLM's default (and is required where vLLM's is).
    for name, info in ours.model_fields.items():
        assert name in vllm_model.model_fields, f"{name} is no field of vLLM's {kind}"
        theirs = vllm_model.model_fields[name]
        assert info.is_required() == theirs.is_required(), name
        if not info.is_required():
            assert _default(info) == _default(theirs), name


def test_tokenize_responses_have_vllms_fields() -> None:
    from vllm.entrypoints.serve.tokenize import protocol as vllm_tokenize

    from lmserve_protocols import tokenize as ours

    for name in ("TokenizeResponse", "DetokenizeResponse"):
        vllm_fields = list(getattr(vllm_tokenize, name).model_fields)
        assert list(getattr(ours, name).model_fields) == vllm_fields, name


def _vllm_pooling_models() -> dict[str, list[tuple[type[BaseModel], type[BaseModel]]]]:
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest
    from vllm.entrypoints.pooling.scoring import protocol as scoring

    from lmserve_protocols.openai import EmbeddingRequest
    from lmserve_protocols.scoring import RerankRequest, ScoreRequest

    return {
        "embedding": [(EmbeddingCompletionRequest, EmbeddingRequest)],
        "rerank": [(scoring.RerankRequest, RerankRequest)],
        # vLLM's four spellings of a score request are one lmserve model.
        "score": [
            (vllm_score, ScoreRequest)
            for vllm_score in (
                scoring.ScoreTextRequest,
                scoring.ScoreQueriesDocumentsRequest,
                scoring.ScoreQueriesItemsRequest,
                scoring.ScoreDataRequest,
            )
        ],
    }


@pytest.mark.parametrize("kind", ["embedding", "rerank", "score"])
def test_every_vllm_pooling_field_is_implemented_or_refused(kind: str) -> None:
    pairs = _vllm_pooling_models()[kind]
    for vllm_model, ours in pairs:
        unaccounted = [
            name for name in vllm_model.model_fields
            if name not in ours.model_fields and name not in NOT_IMPLEMENTED[kind]
        ]  # fmt: skip
        assert unaccounted == [], (
            f"vLLM {vllm_model.__name__} fields neither implemented nor refused"
        )
        for name, info in ours.model_fields.items():
            # Where both have the field, "unset" means the same (request_id: vLLM makes one up;
            # a score request's inputs are required by vLLM's class, one pair of them by ours).
            vllm_field = vllm_model.model_fields.get(name)
            if vllm_field is not None and name != "request_id" and not vllm_field.is_required():
                assert info.default == _default(vllm_field), (kind, name)
    every_field = {name for vllm_model, _ in pairs for name in vllm_model.model_fields}
    for name, default in NOT_IMPLEMENTED[kind].items():
        assert name in every_field, f"{name} is listed as a vLLM {kind} field but vLLM has none"
        model = next(m for m, _ in pairs if name in m.model_fields)
        assert _default(model.model_fields[name]) == default, name
