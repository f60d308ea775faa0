"""Rerank and score: vLLM 0.32's ``/rerank`` (Jina/Cohere shape; also KServe's
``/openai/v1/rerank``, which is vLLM's) and ``/score`` request and response bodies.

Queries and documents are strings, Cohere/Jina ``{"text": ...}`` objects, or vLLM's
``{"content": [{"type": "text", "text": ...}]}``; the server reads the text out of each.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve_protocols.openai import UsageInfo

# A query or document as a client may send it (see the module docstring).
ScoreInput = str | dict[str, Any]


class _ScoringFields(BaseModel):
    """Fields every rerank and score request shares (vLLM's ScoringRequestMixin, the ones
    lmserve implements; the others are refused by the server unless left at vLLM's default)."""

    # Unknown fields are kept so the server can refuse vLLM's unimplemented ones by name.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    user: str | None = None
    request_id: str | None = None
    # Keep this many tokens of each (query, document) pair, document first; -1: the model's
    # maximum.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    # vLLM: false returns the raw logit, not the activation sentence-transformers applies.
    use_activation: bool | None = None
    # lmserve (as its V1/V2 ``parameters.truncate`` and TEI): false refuses a pair longer than
    # the model takes (a 400) instead of cutting the document.
    truncate: bool = True


class RerankRequest(_ScoringFields):
    """``POST /rerank``, ``/v1/rerank``, ``/v2/rerank``, ``/openai/v1/rerank``."""

    query: ScoreInput
    documents: ScoreInput | list[ScoreInput]
    # The best ``top_n`` results; 0 (vLLM's default) returns them all.
    top_n: int = Field(default=0, ge=0)
    # Jina / Cohere v1: false leaves ``document`` out of each result (vLLM always sends it).
    return_documents: bool = True


# vLLM's four spellings of a score request's two inputs.
SCORE_SPELLINGS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"),
                   ("data_1", "data_2"))  # fmt: skip


class ScoreRequest(_ScoringFields):
    """``POST /score``, ``/v1/score``: ``text_1``/``text_2`` (or vLLM's other spellings:
    ``queries``/``documents``, ``queries``/``items``, ``data_1``/``data_2``), scored
    one to one, one to many, or pairwise (many to many, equal lengths)."""

    text_1: ScoreInput | list[ScoreInput] | None = None
    text_2: ScoreInput | list[ScoreInput] | None = None
    queries: ScoreInput | list[ScoreInput] | None = None
    documents: ScoreInput | list[ScoreInput] | None = None
    items: ScoreInput | list[ScoreInput] | None = None
    data_1: ScoreInput | list[ScoreInput] | None = None
    data_2: ScoreInput | list[ScoreInput] | None = None

    @model_validator(mode="after")
    def _one_spelling(self) -> ScoreRequest:
        complete = [pair for pair in SCORE_SPELLINGS if None not in self._values(pair)]
        fields = {name for pair in SCORE_SPELLINGS for name in pair}
        used = {name for name in fields if getattr(self, name) is not None}
        if len(complete) != 1 or used != set(complete[0]):
            names = " or ".join(f"{a}/{b}" for a, b in SCORE_SPELLINGS)
            raise ValueError(f"give exactly one pair of inputs: {names}")
        return self

    def _values(self, pair: tuple[str, str]) -> tuple[Any, Any]:
        return getattr(self, pair[0]), getattr(self, pair[1])

    @property
    def sides(self) -> tuple[str, str]:
        """The names of the two inputs the request used."""
        return next(pair for pair in SCORE_SPELLINGS if None not in self._values(pair))

    @property
    def first(self) -> ScoreInput | list[ScoreInput]:
        value = getattr(self, self.sides[0])
        assert value is not None
        return value  # type: ignore[no-any-return]

    @property
    def second(self) -> ScoreInput | list[ScoreInput]:
        value = getattr(self, self.sides[1])
        assert value is not None
        return value  # type: ignore[no-any-return]


class RerankDocument(BaseModel):
    text: str | None = None
    # vLLM's field for image documents; always null here (text only).
    multi_modal: list[dict[str, Any]] | None = None


class RerankResult(BaseModel):
    index: int
    # Left out with ``return_documents: false``.
    document: RerankDocument | None = Field(default=None, exclude_if=lambda v: v is None)
    relevance_score: float


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"rerank-{uuid.uuid4().hex}")
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ScoreResponseData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"score-{uuid.uuid4().hex}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo
