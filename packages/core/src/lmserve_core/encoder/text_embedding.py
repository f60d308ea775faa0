"""text_embedding: pooled, L2-normalised sentence vectors."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderResult,
    EncoderTask,
    FloatArray,
    ModelInfo,
    OutputTensor,
    TaskContext,
)
from lmserve_core.errors import InvalidInput
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

    def validate(self, request: EncodedRequest, ctx: TaskContext) -> None:
        dims = request.params.dimensions
        if dims is not None:
            check_dimensions(dims, ctx.info)

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if outputs.ndim == 2:  # already pooled by the backend (vLLM's pooling runner)
            pooled = outputs.astype(np.float32)
        else:
            pooled = pool(outputs.astype(np.float32), attention_mask(request, outputs.shape[1]),
                          ctx.info.pooling.mode)  # fmt: skip
        params = request.params
        if params.dimensions is not None:
            # Matryoshka: the leading values are the smaller embedding; normalised after the cut.
            pooled = np.ascontiguousarray(pooled[:, : params.dimensions])
        vectors = l2_normalize(pooled) if params.normalize else pooled
        return EncoderResult(vectors.tolist, [OutputTensor("output-0", "FP32", vectors)])

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        return [("output-0", "FP32", [-1, ctx.info.hidden_size or -1])]


def check_dimensions(dims: int, info: ModelInfo) -> None:
    """``dimensions`` must be a size the model was trained to give (Matryoshka), or its own."""
    full = info.hidden_size
    if dims == full:
        return
    declared = info.matryoshka_dimensions
    if declared is None:
        raise InvalidInput(
            f"this model does not support matryoshka representation: 'dimensions' can only "
            f"be its native {full}",
            param="dimensions",
        )
    if dims < 1 or (full is not None and dims > full):
        raise InvalidInput(f"'dimensions' must be in [1, {full}]", param="dimensions")
    if declared and dims not in declared:
        sizes = ", ".join(str(d) for d in declared)
        raise InvalidInput(
            f"'dimensions' {dims} is not one this model was trained for ({sizes})",
            param="dimensions",
        )
