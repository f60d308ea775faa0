"""rerank: one relevance score per (query, document) pair from a cross-encoder's logit."""

from __future__ import annotations

import numpy as np

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderResult,
    EncoderTask,
    FloatArray,
    OutputTensor,
    TaskContext,
    raw_logits_result,
    sigmoid,
)
from lmserve_core.errors import InvalidInput
from lmserve_core.model_files import ScoreActivation
from lmserve_core.tasks import Task


def activate(logits: FloatArray, activation: ScoreActivation) -> FloatArray:
    """``logits`` [N] as sentence-transformers' ``CrossEncoder.predict`` turns them into scores."""
    x = logits.astype(np.float32)
    if activation == "sigmoid":
        return sigmoid(x)
    if activation == "tanh":
        return np.tanh(x).astype(np.float32)
    return x


class Rerank(EncoderTask):
    task = Task.rerank
    sequence_output = False

    def validate(self, request: EncodedRequest, ctx: TaskContext) -> None:
        if request.params.labels:
            raise InvalidInput(
                "parameters.output 'labels' is for classifiers; a reranker returns scores",
                param="output",
            )

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if ctx.options.return_raw_logits:
            return raw_logits_result(outputs)
        # [N, 1] from a classifier head, [N] from a backend that squeezes it.
        logits = outputs.reshape(outputs.shape[0], -1)[:, 0].astype(np.float32)
        scores = (
            logits if request.params.raw_scores else activate(logits, ctx.info.score_activation)
        )
        return EncoderResult(scores.tolist, [OutputTensor("output-0", "FP32", scores)])

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        if ctx.options.return_raw_logits:
            return [("output-0", "FP32", [-1, 1])]
        return [("output-0", "FP32", [-1])]
