"""Tokenization of PROMPTS: tokenizer.json via `tokenizers` alone vs transformers' fast tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.benchmark(group="tokenize", max_time=0.5, min_rounds=5)

MAX_LENGTH = 256


@pytest.mark.parametrize("n", [1, 32])
def test_rust_tokenizer_encode_batch(
    benchmark: Any,
    rust_tokenizer: Any,
    prompt_batch: Callable[[int], list[str]],
    record_rate: Callable[..., None],
    n: int,
) -> None:
    texts = prompt_batch(n)
    rust_tokenizer.encode_batch(texts, add_special_tokens=True, max_length=MAX_LENGTH)  # warm
    out = benchmark(
        rust_tokenizer.encode_batch, texts, add_special_tokens=True, max_length=MAX_LENGTH
    )
    assert len(out) == n
    record_rate(benchmark, n, tokens=sum(len(e) for e in out))


@pytest.mark.parametrize("n", [1, 32])
def test_transformers_tokenizer_encode_batch(
    benchmark: Any,
    hf_tokenizer: Any,
    prompt_batch: Callable[[int], list[str]],
    record_rate: Callable[..., None],
    n: int,
) -> None:
    texts = prompt_batch(n)
    hf_tokenizer.encode_batch(texts, add_special_tokens=True, max_length=MAX_LENGTH)  # warm
    out = benchmark(
        hf_tokenizer.encode_batch, texts, add_special_tokens=True, max_length=MAX_LENGTH
    )
    assert len(out) == n
    record_rate(benchmark, n, tokens=sum(len(e) for e in out))
