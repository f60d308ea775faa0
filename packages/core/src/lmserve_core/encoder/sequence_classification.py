"""sequence_classification: one label per text."""

from __future__ import annotations

import numpy as np

from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderResult,
    EncoderTask,
    FloatArray,
    OutputTensor,
    TaskContext,
    json_bytes_tensor,
    raw_logits_result,
    round4,
    sigmoid,
    softmax,
)
from lmserve_core.tasks import Task


class SequenceClassification(EncoderTask):
    task = Task.sequence_classification
    sequence_output = False

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if ctx.options.return_raw_logits:
            return raw_logits_result(outputs)
        if request.params.labels:
            return self._labels(outputs, request, ctx)
        if ctx.options.return_probabilities:
            probs = softmax(outputs)
            rows = [{str(i): round4(p) for i, p in enumerate(row)} for row in probs]
            return EncoderResult(rows, lambda: [json_bytes_tensor("output-0", rows)])
        idx = outputs.argmax(axis=-1).astype(np.int64)
        return EncoderResult(idx.tolist, [OutputTensor("output-0", "INT64", idx)])

    def _labels(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        # As the transformers pipeline: sigmoid for one logit or multi-label, else softmax.
        multi = ctx.info.problem_type == "multi_label_classification" or outputs.shape[-1] == 1
        scores = sigmoid(outputs) if multi else softmax(outputs)
        top_k = request.params.top_k or 1
        rows = []
        for row in scores:
            order = np.argsort(-row)[:top_k]
            rows.append(
                [{"label": ctx.info.id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(row[i])}
                 for i in order]
            )  # fmt: skip
        return EncoderResult(rows, lambda: [json_bytes_tensor("output-0", rows)])

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        if ctx.options.return_raw_logits:
            return [("output-0", "FP32", [-1, len(ctx.info.id2label) or -1])]
        if ctx.options.return_probabilities:
            return [("output-0", "BYTES", [-1])]
        return [("output-0", "INT64", [-1])]
