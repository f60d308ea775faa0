"""The encoder tasks' outputs (docs/behaviour.md §4) with a fake tokenizer and designed logits."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from lmserve_core import InvalidInput, Task
from lmserve_core.encoder import EncoderOptions, EncoderResult, ModelInfo, RequestParams
from lmserve_core.encoder.base import AGGREGATIONS, TaskContext
from lmserve_core.encoder.service import ENCODER_TASKS
from lmserve_core.encoder.text_embedding import pool
from lmserve_core.encoder.token_classification import _group, _Piece
from lmserve_core.model_files import PoolingConfig

PAD, CLS, SEP, MASK = 0, 2, 3, 4
V = 20  # fake vocabulary size (conftest.VOCAB)
IDS = {"the": 5, "cat": 6, "sat": 7, "on": 8, "mat": 9, "john": 10, "##son": 11, "lives": 12,
       "in": 13, "new": 14, "york": 15, "paris": 16, "a": 17, "dog": 18, ".": 19}  # fmt: skip


def _softmax(x: list[float]) -> list[float]:
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


def _bytes_json(result: EncoderResult, index: int = 0) -> list[Any]:
    out = result.outputs[index]
    assert out.datatype == "BYTES"
    return [json.loads(v) for v in out.data.reshape(-1)]


# --- sequence_classification --------------------------------------------------------

SEQ_LOGITS = {IDS["the"]: [1.0, 3.0], IDS["a"]: [2.0, -1.0], IDS["john"]: [0.0, 0.0]}


def seq_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Decided by the first word (position 1, after [CLS]).
    return np.array([SEQ_LOGITS[int(row[1])] for row in ids])


def test_sequence_classification_argmax(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.sequence_classification, seq_logits)
    result = infer(service, ["the cat sat", "a dog", "the mat"])
    assert len(backend.calls) == 1
    assert result.predictions == [1, 0, 1]
    assert all(type(p) is int for p in result.predictions)
    (out,) = result.outputs
    assert (out.name, out.datatype, out.shape) == ("output-0", "INT64", [3])
    assert out.data.dtype == np.int64
    assert out.data.tolist() == [1, 0, 1]
    assert result.token_count == 5 + 4 + 4


def test_sequence_classification_probabilities(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.sequence_classification, seq_logits,
                              options=EncoderOptions(return_probabilities=True))  # fmt: skip
    result = infer(service, ["the cat sat", "a dog"])
    assert result.predictions == [{"0": 0.1192, "1": 0.8808}, {"0": 0.9526, "1": 0.0474}]
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("BYTES", [2])
    assert _bytes_json(result) == result.predictions


def test_sequence_classification_raw_logits(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.sequence_classification, seq_logits,
                              options=EncoderOptions(return_raw_logits=True))  # fmt: skip
    result = infer(service, ["the cat", "a cat"])
    assert result.predictions == [[1.0, 3.0], [2.0, -1.0]]
    (out,) = result.outputs
    assert (out.datatype, out.shape, out.data.dtype) == ("FP32", [2, 2], np.float32)


def test_sequence_labels_sorted_with_top_k(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    info = ModelInfo(id2label={0: "neg", 1: "pos", 2: "neutral"})
    logits = [0.5, 2.0, 1.0]
    service, _ = make_service(Task.sequence_classification,
                              lambda ids, mask: np.array([logits] * len(ids)), info=info)  # fmt: skip
    p = _softmax(logits)
    one = infer(service, ["the cat"], {"output": "labels"})
    assert one.predictions == [[{"label": "pos", "score": pytest.approx(p[1], rel=1e-6)}]]
    service, _ = make_service(Task.sequence_classification,
                              lambda ids, mask: np.array([logits] * len(ids)), info=info)  # fmt: skip
    three = infer(service, ["the cat", "a dog"], {"output": "labels", "top_k": 3})
    expected = [{"label": "pos", "score": pytest.approx(p[1], rel=1e-6)},
                {"label": "neutral", "score": pytest.approx(p[2], rel=1e-6)},
                {"label": "neg", "score": pytest.approx(p[0], rel=1e-6)}]  # fmt: skip
    assert three.predictions == [expected, expected]
    assert all(type(e["score"]) is float for e in three.predictions[0])
    assert three.outputs[0].shape == [2]
    assert _bytes_json(three) == [expected, expected]


def test_sequence_labels_default_names_and_sigmoid(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    # No id2label: LABEL_i. multi_label_classification: independent sigmoids.
    info = ModelInfo(problem_type="multi_label_classification")
    service, _ = make_service(Task.sequence_classification, seq_logits, info=info)
    result = infer(service, ["the cat"], {"output": "labels", "top_k": 2})
    sig = [1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(-1.0))]
    assert result.predictions == [[
        {"label": "LABEL_1", "score": pytest.approx(sig[0], rel=1e-6)},
        {"label": "LABEL_0", "score": pytest.approx(sig[1], rel=1e-6)},
    ]]  # fmt: skip
    # A single logit is a sigmoid too.
    service, _ = make_service(Task.sequence_classification,
                              lambda ids, mask: np.full((len(ids), 1), -2.0))  # fmt: skip
    result = infer(service, ["a"], {"output": "labels"})
    assert result.predictions == [[{"label": "LABEL_0",
                                    "score": pytest.approx(1 / (1 + math.exp(2.0)), rel=1e-6)}]]  # fmt: skip


# --- token_classification -----------------------------------------------------------

NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
TOKEN_LABEL = {IDS["john"]: 1, IDS["##son"]: 2, IDS["new"]: 3, IDS["york"]: 4, IDS["paris"]: 3,
               PAD: 4}  # fmt: skip


def token_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.vectorize(lambda t: TOKEN_LABEL.get(int(t), 0))(ids)
    return 5.0 * np.eye(5)[labels]  # [N, L, 5]


def test_token_classification_ids(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, token_logits, info=ModelInfo(id2label=NER))
    result = infer(service, ["john lives in new york", "paris"])
    # One list in a list per instance, L = 7 ids (the short one padded like KServe's).
    assert result.predictions == [[[0, 1, 0, 0, 3, 4, 0]], [[0, 3, 0, 4, 4, 4, 4]]]
    (out,) = result.outputs
    assert (out.name, out.datatype, out.shape) == ("output-0", "INT64", [2, 1, 7])
    assert out.data.dtype == np.int64
    assert out.data[:, 0, :].tolist() == [p[0] for p in result.predictions]


def test_token_classification_probabilities(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, token_logits,
                              options=EncoderOptions(return_probabilities=True))  # fmt: skip
    result = infer(service, ["john york", "in"])
    hot = round(math.exp(5) / (math.exp(5) + 4), 4)
    cold = round(1 / (math.exp(5) + 4), 4)

    def probs(label: int) -> dict[str, float]:
        return {str(k): hot if k == label else cold for k in range(5)}

    # L = 4 dicts per instance.
    assert result.predictions == [
        [probs(0), probs(1), probs(4), probs(0)],
        [probs(0), probs(0), probs(0), probs(4)],
    ]
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("BYTES", [2, 4])
    assert json.loads(out.data[1, 3]) == probs(4)
    assert _bytes_json(result) == [cell for row in result.predictions for cell in row]


def test_token_classification_offsets(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, token_logits,
                              options=EncoderOptions(return_offsets_mapping=True))  # fmt: skip
    result = infer(service, ["johnson  lives", "new"])
    assert result.predictions == [
        {
            "predictions": [[0, 1, 2, 0, 0]],
            "offset_mapping": [[0, 0], [0, 4], [4, 7], [9, 14], [0, 0]],
        },
        {
            "predictions": [[0, 3, 0, 4, 4]],
            "offset_mapping": [[0, 0], [0, 3], [0, 0], [0, 0], [0, 0]],
        },
    ]
    ids_out, offsets_out = result.outputs
    assert ids_out.shape == [2, 1, 5]
    assert (offsets_out.name, offsets_out.datatype, offsets_out.shape) == (
        "offset_mapping",
        "INT64",
        [2, 5, 2],
    )
    assert offsets_out.data[0].tolist() == result.predictions[0]["offset_mapping"]


def test_token_classification_raw_logits(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, token_logits,
                              options=EncoderOptions(return_raw_logits=True))  # fmt: skip
    result = infer(service, ["john"])
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("FP32", [1, 3, 5])
    assert result.predictions[0][1] == [0.0, 5.0, 0.0, 0.0, 0.0]


# Text "john johnson lives in new york": tokens
#   0 [CLS]  1 john(0,4)  2 john(5,9)  3 ##son(9,12)  4 lives(13,18)  5 in(19,21)
#   6 new(22,25)  7 york(26,30)  8 [SEP]
# Probabilities over O, B-PER, I-PER, B-LOC, I-LOC, chosen so each strategy differs.
NER_TEXT = "john johnson lives in new york"
NER_PROBS = [
    [0.01, 0.96, 0.01, 0.01, 0.01],  # [CLS]: a confident B-PER that must be ignored
    [0.05, 0.9, 0.02, 0.02, 0.01],  # john -> B-PER 0.9
    [0.1, 0.7, 0.1, 0.05, 0.05],  # john (of johnson) -> B-PER 0.7
    [0.02, 0.2, 0.03, 0.72, 0.03],  # ##son -> B-LOC 0.72
    [0.97, 0.01, 0.01, 0.005, 0.005],  # lives -> O
    [0.96, 0.01, 0.01, 0.01, 0.01],  # in -> O
    [0.04, 0.01, 0.01, 0.9, 0.04],  # new -> B-LOC 0.9
    [0.1, 0.01, 0.04, 0.05, 0.8],  # york -> I-LOC 0.8
    [0.01, 0.96, 0.01, 0.01, 0.01],  # [SEP]
]


def ner_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    assert ids.shape == (1, 9)
    return np.log(np.array([NER_PROBS]))


def _entities(
    make_service: Callable[..., Any], infer: Callable[..., Any], strategy: str
) -> list[Any]:
    service, _ = make_service(Task.token_classification, ner_logits, info=ModelInfo(id2label=NER))
    result = infer(service, [NER_TEXT], {"output": "labels", "aggregation_strategy": strategy})
    assert result.outputs[0].shape == [1]
    assert _bytes_json(result) == [[{**e, "score": pytest.approx(e["score"], rel=1e-6)}
                                    for e in result.predictions[0]]]  # fmt: skip
    return result.predictions[0]


def _ent(group: str, score: float, start: int, end: int) -> dict[str, Any]:
    return {"entity_group": group, "score": pytest.approx(score, rel=1e-5),
            "word": NER_TEXT[start:end], "start": start, "end": end}  # fmt: skip


def test_entities_aggregation_none(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    assert _entities(make_service, infer, "none") == [
        {"entity": "B-PER", "score": pytest.approx(0.9, rel=1e-5), "index": 1, "word": "john", "start": 0, "end": 4},
        {"entity": "B-PER", "score": pytest.approx(0.7, rel=1e-5), "index": 2, "word": "john", "start": 5, "end": 9},
        {"entity": "B-LOC", "score": pytest.approx(0.72, rel=1e-5), "index": 3, "word": "##son", "start": 9, "end": 12},
        {"entity": "B-LOC", "score": pytest.approx(0.9, rel=1e-5), "index": 6, "word": "new", "start": 22, "end": 25},
        {"entity": "I-LOC", "score": pytest.approx(0.8, rel=1e-5), "index": 7, "word": "york", "start": 26, "end": 30},
    ]  # fmt: skip


def test_entities_aggregation_simple(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    # Token level: B- starts a group, so "john" and "johnson"'s first piece stay apart,
    # and the "##son" piece becomes its own LOC.
    assert _entities(make_service, infer, "simple") == [
        _ent("PER", 0.9, 0, 4),
        _ent("PER", 0.7, 5, 9),
        _ent("LOC", 0.72, 9, 12),
        _ent("LOC", (0.9 + 0.8) / 2, 22, 30),
    ]
    assert _entities(make_service, infer, "simple")[2]["word"] == "son"


def test_entities_aggregation_first(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    assert _entities(make_service, infer, "first") == [
        _ent("PER", 0.9, 0, 4),
        _ent("PER", 0.7, 5, 12),
        _ent("LOC", 0.85, 22, 30),
    ]


def test_entities_aggregation_average(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    # johnson: mean of its two pieces = [0.06, 0.45, 0.065, 0.385, 0.04] -> B-PER 0.45
    assert _entities(make_service, infer, "average") == [
        _ent("PER", 0.9, 0, 4),
        _ent("PER", 0.45, 5, 12),
        _ent("LOC", 0.85, 22, 30),
    ]


def test_entities_aggregation_max(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    # johnson: the piece with the highest score (##son, 0.72) decides -> B-LOC
    assert _entities(make_service, infer, "max") == [
        _ent("PER", 0.9, 0, 4),
        _ent("LOC", 0.72, 5, 12),
        _ent("LOC", 0.85, 22, 30),
    ]


def test_entities_default_aggregation_is_simple(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, ner_logits, info=ModelInfo(id2label=NER))
    result = infer(service, [NER_TEXT], {"output": "labels"})
    assert [e["word"] for e in result.predictions[0]] == ["john", "john", "son", "new york"]


def _piece(label: str, start: int, end: int, score: float = 1.0) -> _Piece:
    return _Piece(label, score, start, end, 0, "")


def test_grouping_rules() -> None:
    text = "abcdefghijklmnopqrstuvwxyz"
    pieces = [
        _piece("B-PER", 0, 1, 0.5), _piece("I-PER", 1, 2, 0.7),  # one PER
        _piece("I-LOC", 3, 4), _piece("I-LOC", 5, 6),  # I- of a new type starts a group
        _piece("B-LOC", 7, 8),  # B- always starts one
        _piece("O", 9, 10), _piece("O", 10, 11),  # dropped
        _piece("I-PER", 12, 13),  # I- without a B- opens an entity
        _piece("MISC", 14, 15), _piece("MISC", 15, 16),  # untagged labels join
    ]  # fmt: skip
    groups = _group(pieces, text)
    assert [(g["entity_group"], g["start"], g["end"], g["word"]) for g in groups] == [
        ("PER", 0, 2, "ab"),
        ("LOC", 3, 6, "def"),
        ("LOC", 7, 8, "h"),
        ("PER", 12, 13, "m"),
        ("MISC", 14, 16, "op"),
    ]
    assert groups[0]["score"] == pytest.approx(0.6)


# --- fill_mask ----------------------------------------------------------------------

MASK_PROBS = [
    {IDS["mat"]: 0.4, IDS["dog"]: 0.2, IDS["cat"]: 0.15, IDS["paris"]: 0.1, IDS["york"]: 0.05},
    {IDS["cat"]: 0.6, IDS["sat"]: 0.3},
]


def _row(top: dict[int, float]) -> np.ndarray:
    rest = (1.0 - sum(top.values())) / (V - len(top))
    return np.log(np.array([top.get(t, rest) for t in range(V)]))


def mask_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The k-th mask of a row gets MASK_PROBS[k]; other positions are uniform."""
    out = np.zeros((*ids.shape, V))
    for i, row in enumerate(ids):
        for k, j in enumerate(np.flatnonzero(row == MASK)):
            out[i, j] = _row(MASK_PROBS[k])
    return out


def test_fill_mask_decodes_the_argmax(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.fill_mask, mask_logits)
    result = infer(service, ["the cat sat on the [MASK] .", "the [MASK] sat on the [MASK]"])
    assert result.predictions == ["mat", "mat cat"]
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("BYTES", [2])
    assert out.data.tolist() == ["mat", "mat cat"]


def test_fill_mask_probabilities_top_k(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    options = EncoderOptions(return_probabilities=True)
    service, _ = make_service(Task.fill_mask, mask_logits, options=options)
    result = infer(service, ["the cat sat on the [MASK] .", "[MASK] [MASK]"])
    first = {"9": 0.4, "18": 0.2, "6": 0.15, "16": 0.1, "15": 0.05}
    assert result.predictions[0] == [first]
    assert list(result.predictions[0][0]) == list(first)  # most likely first
    assert all(isinstance(p, float) for p in result.predictions[0][0].values())
    assert len(result.predictions[1]) == 2  # one dict per mask
    second = list(result.predictions[1][1].items())
    assert second[:2] == [("6", 0.6), ("7", 0.3)]
    # Then three of the 18 equally likely others: (1 - 0.9) / 18 each.
    assert len(second) == 5
    assert [p for _, p in second[2:]] == [round(0.1 / 18, 4)] * 3
    assert not {k for k, _ in second[2:]} & {"6", "7"}
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("BYTES", [2])
    assert _bytes_json(result) == result.predictions
    # top_k from the request.
    service, _ = make_service(Task.fill_mask, mask_logits, options=options)
    result = infer(service, ["the [MASK]"], {"top_k": 2})
    assert result.predictions == [[{"9": 0.4, "18": 0.2}]]


def test_fill_mask_labels(make_service: Callable[..., Any], infer: Callable[..., Any]) -> None:
    service, _ = make_service(Task.fill_mask, mask_logits)
    result = infer(service, ["the cat sat on the [MASK] ."], {"output": "labels", "top_k": 3})
    assert result.predictions == [[
        {"score": pytest.approx(0.4, rel=1e-5), "token": 9, "token_str": "mat",
         "sequence": "the cat sat on the mat ."},
        {"score": pytest.approx(0.2, rel=1e-5), "token": 18, "token_str": "dog",
         "sequence": "the cat sat on the dog ."},
        {"score": pytest.approx(0.15, rel=1e-5), "token": 6, "token_str": "cat",
         "sequence": "the cat sat on the cat ."},
    ]]  # fmt: skip
    assert result.outputs[0].shape == [1]
    # Two masks: a list per mask; as in the pipeline, special tokens stay in the sequence
    # so that the other mask remains visible.
    service, _ = make_service(Task.fill_mask, mask_logits)
    result = infer(service, ["the [MASK] sat on the [MASK]"], {"output": "labels", "top_k": 1})
    assert result.predictions == [[
        [{"score": pytest.approx(0.4, rel=1e-5), "token": 9, "token_str": "mat",
          "sequence": "[CLS] the mat sat on the [MASK] [SEP]"}],
        [{"score": pytest.approx(0.6, rel=1e-5), "token": 6, "token_str": "cat",
          "sequence": "[CLS] the [MASK] sat on the cat [SEP]"}],
    ]]  # fmt: skip


def test_fill_mask_without_mask_is_invalid(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.fill_mask, mask_logits)
    with pytest.raises(InvalidInput) as info:
        infer(service, ["the [MASK]", "no mask here"])
    assert info.value.param == "instances"
    assert "instance 1" in info.value.message
    assert backend.calls == []  # rejected before the model


def test_fill_mask_with_mask_truncated_away(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.fill_mask, mask_logits, info=ModelInfo(max_length=4))
    with pytest.raises(InvalidInput, match="truncated"):
        infer(service, ["the cat sat [MASK]"])
    assert backend.calls == []


# --- text_embedding -----------------------------------------------------------------

D = 4
TABLE = np.random.default_rng(7).standard_normal((V, D)).astype(np.float32)


def hidden_states(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    hidden = TABLE[ids].copy()
    hidden[mask == 0] = 1000.0  # padding must never leak into a pooled vector
    return hidden


EMBED_TEXTS = ["the cat sat on the mat", "a dog", "paris"]


def _expected(tokenizer: Any, mode: str) -> np.ndarray:
    rows = []
    for text in EMBED_TEXTS:
        ids = tokenizer.encode_one(text, add_special_tokens=True, max_length=None).ids
        h = TABLE[ids].astype(np.float64)
        if mode == "mean":
            v = h.mean(axis=0)
        elif mode == "cls":
            v = h[0]
        elif mode == "max":
            v = h.max(axis=0)
        elif mode == "mean_sqrt_len":
            v = h.sum(axis=0) / math.sqrt(len(ids))
        elif mode == "weightedmean":
            w = np.arange(1, len(ids) + 1)[:, None]
            v = (h * w).sum(axis=0) / w.sum()
        else:  # lasttoken
            v = h[-1]
        rows.append(v / np.linalg.norm(v))
    return np.array(rows)


@pytest.mark.parametrize(
    "mode", ["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"]
)
def test_text_embedding_pooling(
    mode: Any, make_service: Callable[..., Any], infer: Callable[..., Any], tokenizer: Any
) -> None:
    info = ModelInfo(pooling=PoolingConfig(mode=mode), hidden_size=D)
    service, backend = make_service(Task.text_embedding, hidden_states, info=info)
    result = infer(service, EMBED_TEXTS)
    (out,) = result.outputs
    assert (out.name, out.datatype, out.shape) == ("output-0", "FP32", [3, D])
    assert out.data.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.data, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.data, _expected(tokenizer, mode), rtol=1e-5, atol=1e-6)
    assert np.asarray(result.predictions) == pytest.approx(out.data)
    assert backend.calls[0]["input_ids"].shape == (3, 8)  # padding was really there


def test_default_pooling_is_mean() -> None:
    assert PoolingConfig().mode == "mean"


def test_pool_ignores_padding_directly() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1.0, 1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[2.0, -1.0]])
    np.testing.assert_allclose(pool(hidden, mask, "max"), [[3.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[1.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, "lasttoken"), [[3.0, -4.0]])
    np.testing.assert_allclose(pool(hidden, mask, "weightedmean"), [[7 / 3, -2.0]])
    np.testing.assert_allclose(
        pool(hidden, mask, "mean_sqrt_len"), [[4 / math.sqrt(2), -2 / math.sqrt(2)]]
    )


def test_embedding_of_zero_vector_does_not_divide_by_zero(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.text_embedding, lambda ids, mask: np.zeros((*ids.shape, 3)))
    result = infer(service, ["a"])
    assert result.predictions == [[0.0, 0.0, 0.0]]


# --- request parameters -------------------------------------------------------------


def test_request_params_defaults() -> None:
    for raw in (None, {}):
        p = RequestParams.parse(raw)
        assert (p.labels, p.truncate, p.top_k, p.aggregation_strategy) == (
            False,
            True,
            None,
            "simple",
        )


def test_request_params_values() -> None:
    p = RequestParams.parse({"output": "labels", "truncate": False, "top_k": 3,
                             "aggregation_strategy": "max", "unrelated": 1})  # fmt: skip
    assert (p.labels, p.truncate, p.top_k, p.aggregation_strategy) == (True, False, 3, "max")
    assert RequestParams.parse({"output": "default"}).labels is False
    for strategy in AGGREGATIONS:
        assert (
            RequestParams.parse({"aggregation_strategy": strategy}).aggregation_strategy == strategy
        )
    assert RequestParams.parse({"top_k": 1000}).top_k == 1000


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"output": "label"}, "output"),
        ({"output": "LABELS"}, "output"),
        ({"output": 1}, "output"),
        ({"truncate": "false"}, "truncate"),
        ({"truncate": 0}, "truncate"),
        ({"truncate": None}, "truncate"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1001}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": "3"}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"aggregation_strategy": "mean"}, "aggregation_strategy"),
        ({"aggregation_strategy": "SIMPLE"}, "aggregation_strategy"),
        ({"aggregation_strategy": None}, "aggregation_strategy"),
    ],
)
def test_request_params_errors(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as info:
        RequestParams.parse(raw)
    assert info.value.param == param


def test_bad_parameters_reach_the_client_before_the_model(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.sequence_classification, seq_logits)
    with pytest.raises(InvalidInput):
        infer(service, ["the cat"], {"top_k": 0})
    assert backend.calls == []


# --- V2 metadata --------------------------------------------------------------------


def _meta(
    task: Task, info: ModelInfo | None = None, **options: bool
) -> list[tuple[str, str, list[int]]]:
    ctx = TaskContext(tokenizer=None, info=info or ModelInfo(), options=EncoderOptions(**options))  # type: ignore[arg-type]
    return ENCODER_TASKS[task].output_metadata(ctx)


def test_output_metadata_matches_the_outputs() -> None:
    info = ModelInfo(id2label={0: "a", 1: "b"}, hidden_size=384, vocab_size=V)
    assert _meta(Task.sequence_classification, info) == [("output-0", "INT64", [-1])]
    assert _meta(Task.sequence_classification, info, return_probabilities=True) == [
        ("output-0", "BYTES", [-1])
    ]
    assert _meta(Task.sequence_classification, info, return_raw_logits=True) == [
        ("output-0", "FP32", [-1, 2])
    ]
    assert _meta(Task.token_classification, info) == [("output-0", "INT64", [-1, 1, -1])]
    assert _meta(Task.token_classification, info, return_probabilities=True) == [
        ("output-0", "BYTES", [-1, -1])
    ]
    assert _meta(Task.token_classification, info, return_offsets_mapping=True) == [
        ("output-0", "INT64", [-1, 1, -1]), ("offset_mapping", "INT64", [-1, -1, 2])]  # fmt: skip
    assert _meta(Task.fill_mask, info) == [("output-0", "BYTES", [-1])]
    assert _meta(Task.fill_mask, info, return_raw_logits=True) == [
        ("output-0", "FP32", [-1, -1, V])
    ]
    assert _meta(Task.text_embedding, info) == [("output-0", "FP32", [-1, 384])]
    assert _meta(Task.text_embedding) == [("output-0", "FP32", [-1, -1])]


def test_each_protocol_shape_is_built_on_first_use_only() -> None:
    built: list[str] = []

    def predictions() -> list[Any]:
        built.append("v1")
        return [1]

    def outputs() -> list[Any]:
        built.append("v2")
        return []

    result = EncoderResult(predictions, outputs)
    assert built == []
    assert result.predictions == [1] and result.predictions == [1]
    assert built == ["v1"]  # once, and V2 never
    assert result.outputs == [] and built == ["v1", "v2"]


def test_a_v1_labels_request_never_json_encodes_v2_tensors(
    make_service: Any, infer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmserve_core.encoder.sequence_classification as seq

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("V2 BYTES built for a V1 request")

    monkeypatch.setattr(seq, "json_bytes_tensor", refuse)
    service, _ = make_service(Task.sequence_classification, seq_logits)
    result = infer(service, ["the cat sat", "a dog"], {"output": "labels"})
    assert [len(row) for row in result.predictions] == [1, 1]  # top-1 label each
    assert all(isinstance(row[0]["label"], str) for row in result.predictions)
    with pytest.raises(AssertionError, match="V2 BYTES"):
        _ = result.outputs
