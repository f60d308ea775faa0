"""text_embedding: pooled, L2-normalised sentence vectors."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderResult,
    EncoderTask,
    FloatArray,
    OutputTensor,
    TaskContext,
)
from lmserve_core.model_files import PoolingMode
from lmserve_core.tasks import Task


def attention_mask(request: EncodedRequest, length: int) -> FloatArray:
    mask = np.zeros((request.size, length), dtype=np.float32)
    for i, enc in enumerate(request.encodings):
        mask[i, : len(enc)] = 1.0
    return mask


def pool(hidden: FloatArray, mask: FloatArray, mode: PoolingMode) -> FloatArray:
    """Sentence-transformers pooling over ``hidden`` [N, L, D] with ``mask`` [N, L]."""
    return np.asarray(_pool(hidden, mask, mode), dtype=np.float32)


def _pool(hidden: FloatArray, mask: FloatArray, mode: PoolingMode) -> Any:
    m = mask[:, :, None]
    lengths = np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1)
    if mode == "lasttoken":
        last = mask.sum(axis=1).astype(np.int64) - 1
        return hidden[np.arange(hidden.shape[0]), np.clip(last, 0, None)]
    if mode == "weightedmean":
        weights = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None] * m
        return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    summed = (hidden * m).sum(axis=1)
    if mode == "mean_sqrt_len":
        return summed / np.sqrt(lengths)
    return summed / lengths


def l2_normalize(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.clip(norms, 1e-12, None), dtype=np.float32)


class TextEmbedding(EncoderTask):
    task = Task.text_embedding
    model_output = "last_hidden_state"

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if outputs.ndim == 2:  # already pooled by the backend (vLLM's pooling runner)
            vectors = l2_normalize(outputs.astype(np.float32))
            return EncoderResult(vectors.tolist, [OutputTensor("output-0", "FP32", vectors)])
        pooled = pool(outputs.astype(np.float32), attention_mask(request, outputs.shape[1]),
                      ctx.info.pooling.mode)  # fmt: skip
        vectors = l2_normalize(pooled)
        return EncoderResult(vectors.tolist, [OutputTensor("output-0", "FP32", vectors)])

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        return [("output-0", "FP32", [-1, ctx.info.hidden_size or -1])]
