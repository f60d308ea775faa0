"""Encoder post-processing (lmserve_core.encoder): what runs on a request's slice of the
model output after the forward pass, via the handlers in ``ENCODER_TASKS``.

Inputs are realistic in shape: PROMPTS tokenized by the model's tokenizer.json (the request's
``EncodedRequest``), a random float32 last hidden state [N, L, 384] for text_embedding (L the
request's longest text, as the service trims it) and random [N, 2] logits for
sequence_classification.

Each case times what one protocol's request pays: the task's post-processing and then the shape
that protocol reads (``predictions`` for KServe V1, ``outputs`` for V2 and OpenAI embeddings);
a result builds each shape on first use only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderOptions,
    ModelInfo,
    RequestParams,
    TaskContext,
)
from lmserve_core.encoder.service import ENCODER_TASKS
from lmserve_core.model_files import read_pooling_config
from lmserve_core.tasks import Task

pytestmark = pytest.mark.benchmark(group="encoder-postprocess", max_time=0.5, min_rounds=5)

HIDDEN = 384
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


@pytest.fixture(scope="module")
def make_request(
    rust_tokenizer: Any, prompt_batch: Callable[[int], list[str]]
) -> Callable[[int, RequestParams], EncodedRequest]:
    def make(n: int, params: RequestParams) -> EncodedRequest:
        texts = prompt_batch(n)
        encodings = rust_tokenizer.encode_batch(texts, add_special_tokens=True, max_length=256)
        return EncodedRequest(texts, encodings, params)

    return make


def _context(tokenizer: Any, model_path: Path, options: EncoderOptions) -> TaskContext:
    info = ModelInfo(
        id2label=LABELS,
        pooling=read_pooling_config(model_path),
        max_length=256,
        hidden_size=HIDDEN,
    )
    return TaskContext(tokenizer=tokenizer, info=info, options=options)


def _shape(result: Any, protocol: str) -> Any:
    return result.predictions if protocol == "v1" else result.outputs


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("n", [1, 32])
def test_text_embedding_postprocess(
    benchmark: Any,
    rust_tokenizer: Any,
    model_path: Path,
    make_request: Callable[[int, RequestParams], EncodedRequest],
    record_rate: Callable[..., None],
    n: int,
    protocol: str,
) -> None:
    handler = ENCODER_TASKS[Task.text_embedding]
    request = make_request(n, RequestParams())
    ctx = _context(rust_tokenizer, model_path, EncoderOptions())
    hidden = np.random.default_rng(0).standard_normal((n, request.seq_len, HIDDEN), np.float32)
    benchmark(lambda: _shape(handler.postprocess(hidden, request, ctx), protocol))
    result = handler.postprocess(hidden, request, ctx)
    assert result.outputs[0].data.shape == (n, HIDDEN)
    record_rate(benchmark, n, seq_len=request.seq_len)


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("mode", ["argmax", "labels", "probabilities"])
def test_sequence_classification_postprocess(
    benchmark: Any,
    rust_tokenizer: Any,
    model_path: Path,
    make_request: Callable[[int, RequestParams], EncodedRequest],
    record_rate: Callable[..., None],
    mode: str,
    protocol: str,
) -> None:
    n = 32
    handler = ENCODER_TASKS[Task.sequence_classification]
    request = make_request(
        n, RequestParams.parse({"output": "labels"} if mode == "labels" else None)
    )
    options = EncoderOptions(return_probabilities=mode == "probabilities")
    ctx = _context(rust_tokenizer, model_path, options)
    logits = np.random.default_rng(0).standard_normal((n, len(LABELS)), np.float32)
    benchmark(lambda: _shape(handler.postprocess(logits, request, ctx), protocol))
    result = handler.postprocess(logits, request, ctx)
    assert len(result.predictions) == n and len(result.outputs[0].data) == n
    record_rate(benchmark, n)
