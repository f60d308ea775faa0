"""fill_mask: the most likely token(s) at each mask position."""

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
    json_bytes_tensor,
    raw_logits_result,
    round4,
    softmax,
)
from lmserve_core.errors import InvalidInput
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding

DEFAULT_TOP_K = 5


def _mask_positions(enc: Encoding, mask_id: int | None) -> list[int]:
    return [j for j, token in enumerate(enc.ids) if token == mask_id]


class FillMask(EncoderTask):
    task = Task.fill_mask

    def validate(self, request: EncodedRequest, ctx: TaskContext) -> None:
        mask_id = ctx.tokenizer.mask_token_id
        for i, enc in enumerate(request.encodings):
            if not _mask_positions(enc, mask_id):
                raise InvalidInput(
                    f"instance {i} has no mask token {ctx.tokenizer.mask_token!r} "
                    "(or it was truncated away)",
                    param="instances",
                )

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if ctx.options.return_raw_logits:
            return raw_logits_result(outputs)
        mask_id = ctx.tokenizer.mask_token_id
        rows: list[Any] = []
        for enc, logits in zip(request.encodings, outputs, strict=True):
            positions = _mask_positions(enc, mask_id)
            if request.params.labels:
                single = len(positions) == 1
                per_mask = [
                    self._labelled(enc, logits, pos, request, ctx, single=single)
                    for pos in positions
                ]
                rows.append(per_mask[0] if len(per_mask) == 1 else per_mask)
            elif ctx.options.return_probabilities:
                top_k = request.params.top_k or DEFAULT_TOP_K
                probs = softmax(logits[positions])
                rows.append([
                    {str(int(t)): round4(p[t]) for t in np.argsort(-p)[:top_k]} for p in probs
                ])  # fmt: skip
            else:
                best = logits[positions].argmax(axis=-1)
                rows.append(ctx.tokenizer.decode([int(t) for t in best]))
        if request.params.labels or ctx.options.return_probabilities:
            return EncoderResult(rows, lambda: [json_bytes_tensor("output-0", rows)])
        strings = np.empty(len(rows), dtype=object)
        strings[:] = rows
        return EncoderResult(rows, [OutputTensor("output-0", "BYTES", strings)])

    @staticmethod
    def _labelled(
        enc: Encoding,
        logits: FloatArray,
        pos: int,
        request: EncodedRequest,
        ctx: TaskContext,
        *,
        single: bool,
    ) -> list[dict[str, Any]]:
        probs = softmax(logits[pos])
        out = []
        for token in np.argsort(-probs)[: request.params.top_k or DEFAULT_TOP_K]:
            ids = list(enc.ids)
            ids[pos] = int(token)
            out.append({
                "score": float(probs[token]),
                "token": int(token),
                "token_str": ctx.tokenizer.decode([int(token)]),
                # As the pipeline: with several masks keep special tokens, or the other
                # [MASK]s would vanish from the sequence.
                "sequence": ctx.tokenizer.decode(ids, skip_special_tokens=single),
            })  # fmt: skip
        return out

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        if ctx.options.return_raw_logits:
            return [("output-0", "FP32", [-1, -1, ctx.info.vocab_size or -1])]
        return [("output-0", "BYTES", [-1])]
