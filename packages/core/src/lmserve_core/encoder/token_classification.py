"""token_classification: one label per token, or entities grouped as the NER pipeline does."""

from __future__ import annotations

from dataclasses import dataclass
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
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding


@dataclass
class _Piece:
    """A token (aggregation "none"/"simple") or a word (first/average/max)."""

    label: str
    score: float
    start: int
    end: int
    index: int
    word: str


class TokenClassification(EncoderTask):
    task = Task.token_classification

    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        if ctx.options.return_raw_logits:
            result = raw_logits_result(outputs)
        elif request.params.labels:
            return self._entities(outputs, request, ctx)
        elif ctx.options.return_probabilities:
            probs = softmax(outputs)
            rows = [
                [{str(k): round4(p) for k, p in enumerate(tok)} for tok in inst] for inst in probs
            ]
            flat = [cell for row in rows for cell in row]
            shape = probs.shape[:2]
            result = EncoderResult(rows, lambda: [json_bytes_tensor("output-0", flat, shape)])
        else:
            ids = outputs.argmax(axis=-1).astype(np.int64)  # [N, L]
            result = EncoderResult(
                lambda: [[row.tolist()] for row in ids],
                [OutputTensor("output-0", "INT64", ids[:, None, :])],
            )
        if ctx.options.return_offsets_mapping:
            return _with_offsets(result, request, outputs.shape[1])
        return result

    def _entities(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        strategy = request.params.aggregation_strategy
        rows: list[list[dict[str, Any]]] = []
        for text, enc, logits in zip(request.texts, request.encodings, outputs, strict=True):
            scores = softmax(logits[: len(enc)])
            if strategy == "none":
                pieces = _token_pieces(text, enc, scores, ctx)
                rows.append([
                    {"entity": p.label, "score": p.score, "index": p.index, "word": p.word,
                     "start": p.start, "end": p.end}
                    for p in pieces if p.label != "O"
                ])  # fmt: skip
                continue
            if strategy == "simple":
                pieces = _token_pieces(text, enc, scores, ctx)
            else:
                pieces = _word_pieces(text, enc, scores, ctx, strategy)
            rows.append(_group(pieces, text))
        return EncoderResult(rows, lambda: [json_bytes_tensor("output-0", rows)])

    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        if ctx.options.return_raw_logits:
            meta = [("output-0", "FP32", [-1, -1, len(ctx.info.id2label) or -1])]
        elif ctx.options.return_probabilities:
            meta = [("output-0", "BYTES", [-1, -1])]
        else:
            meta = [("output-0", "INT64", [-1, 1, -1])]
        if ctx.options.return_offsets_mapping:
            meta.append(("offset_mapping", "INT64", [-1, -1, 2]))
        return meta


def _with_offsets(result: EncoderResult, request: EncodedRequest, length: int) -> EncoderResult:
    offsets = np.zeros((request.size, length, 2), dtype=np.int64)
    for i, enc in enumerate(request.encodings):
        if enc.offsets:
            offsets[i, : len(enc)] = np.asarray(enc.offsets, dtype=np.int64)
    return EncoderResult(
        lambda: [
            {"predictions": pred, "offset_mapping": offsets[i].tolist()}
            for i, pred in enumerate(result.predictions)
        ],
        lambda: [*result.outputs, OutputTensor("offset_mapping", "INT64", offsets)],
    )


def _label(ctx: TaskContext, index: int) -> str:
    return ctx.info.id2label.get(index, f"LABEL_{index}")


def _token_pieces(text: str, enc: Encoding, scores: FloatArray, ctx: TaskContext) -> list[_Piece]:
    pieces = []
    for j, (start, end) in enumerate(enc.offsets):
        if enc.special_tokens_mask[j]:
            continue
        k = int(scores[j].argmax())
        word = ctx.tokenizer.id_to_token(enc.ids[j])
        pieces.append(_Piece(_label(ctx, k), float(scores[j, k]), start, end, j, word))
    return pieces


def _word_pieces(
    text: str, enc: Encoding, scores: FloatArray, ctx: TaskContext, strategy: str
) -> list[_Piece]:
    """Merge sub-word tokens into words before labelling (pipeline first/average/max)."""
    words: dict[int, list[int]] = {}
    for j, word_id in enumerate(enc.word_ids):
        if word_id is not None and not enc.special_tokens_mask[j]:
            words.setdefault(word_id, []).append(j)
    pieces = []
    for tokens in words.values():
        if strategy == "first":
            word_scores = scores[tokens[0]]
        elif strategy == "average":
            word_scores = scores[tokens].mean(axis=0)
        else:  # max: the token whose best score is highest decides
            word_scores = scores[max(tokens, key=lambda t: float(scores[t].max()))]
        k = int(word_scores.argmax())
        start, end = enc.offsets[tokens[0]][0], enc.offsets[tokens[-1]][1]
        pieces.append(
            _Piece(_label(ctx, k), float(word_scores[k]), start, end, tokens[0], text[start:end])
        )
    return pieces


def _split_tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group(pieces: list[_Piece], text: str) -> list[dict[str, Any]]:
    """Join adjacent pieces of one entity: a B- tag or a new type starts a group."""
    groups: list[list[_Piece]] = []
    for piece in pieces:
        bi, tag = _split_tag(piece.label)
        if groups and bi != "B" and _split_tag(groups[-1][-1].label)[1] == tag:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    entities = []
    for group in groups:
        tag = _split_tag(group[0].label)[1]
        if tag == "O":
            continue
        start, end = group[0].start, group[-1].end
        entities.append({
            "entity_group": tag,
            "score": float(np.mean([p.score for p in group])),
            "word": text[start:end],
            "start": start,
            "end": end,
        })  # fmt: skip
    return entities
