"""What rerank and score requests mean, apart from the model: reading their inputs, pairing
queries with documents (vLLM's 1:1, 1:N, N:N rules), ranking, and cosine scores for an
embedding model (vLLM's bi-encoder scoring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lmserve_core.errors import InvalidInput


def input_text(value: Any, param: str) -> str:
    """One query or document: a string, a Cohere/Jina ``{"text": ...}`` object, or vLLM's
    ``{"content": [{"type": "text", "text": ...}]}`` with text parts only."""
    text: Any = None
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and set(value) == {"text"}:
        text = value["text"]
    elif (
        isinstance(value, dict) and set(value) == {"content"} and isinstance(value["content"], list)
    ):
        parts = value["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            raise InvalidInput(f"{param}: only text content parts are supported (this model "
                               "reads text, not images or video)", param=param)  # fmt: skip
        texts = [p.get("text") for p in parts]
        text = "".join(t for t in texts if isinstance(t, str)) if texts else None
    if not isinstance(text, str):
        raise InvalidInput(
            f"{param} must be a string, {{'text': string}} or {{'content': [text parts]}}",
            param=param,
        )
    if not text:
        raise InvalidInput(f"{param} must not be empty", param=param)
    return text


def input_texts(value: Any, param: str) -> list[str]:
    """A single input or a list of them, as texts (an empty list is a 400)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InvalidInput(f"{param} must not be empty", param=param)
    return [input_text(item, f"{param}[{i}]" if isinstance(value, list) else param)
            for i, item in enumerate(items)]  # fmt: skip


def pair_up(first: list[str], second: list[str], names: tuple[str, str]) -> list[tuple[str, str]]:
    """vLLM's rule: one first input against every second one (1:1, 1:N), or the two lists
    pairwise (N:N, equal lengths)."""
    if len(first) == 1:
        return [(first[0], doc) for doc in second]
    if len(first) != len(second):
        raise InvalidInput(
            f"{names[0]} and {names[1]} must be 1:1, 1:N or N:N; got {len(first)} and "
            f"{len(second)}",
            param=names[1],
        )
    return list(zip(first, second, strict=True))


def ranking(scores: Sequence[float], top_n: int) -> list[int]:
    """Indices by score, best first (ties keep input order), the best ``top_n`` (0: all)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if 0 < top_n < len(order) else order


def cosine_scores(
    vectors: npt.NDArray[np.float32], first: list[int], second: list[int]
) -> list[float]:
    """Cosine similarity of rows ``first[i]`` and ``second[i]`` of ``vectors``."""
    unit = vectors / np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)
    return [float(np.dot(unit[a], unit[b])) for a, b in zip(first, second, strict=True)]
