"""Rerank and the retrieval surface's core logic: task inference, cross-encoder and Matryoshka
config reading, the rerank and embedding handlers, request inputs, pairing, ranking and
per-request truncation (docs/behaviour.md §2, §4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmserve_core import InvalidInput, Task
from lmserve_core.encoder import EncoderOptions, ModelInfo, RequestParams, Truncation
from lmserve_core.encoder.base import EncodedRequest, TaskContext
from lmserve_core.encoder.rerank import Rerank
from lmserve_core.encoder.service import check_pairs
from lmserve_core.encoder.text_embedding import TextEmbedding
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import (
    cross_encoder_activation,
    infer_model_task,
    is_cross_encoder,
    matryoshka_dimensions,
)
from lmserve_core.scoring import cosine_scores, input_text, input_texts, pair_up, ranking
from lmserve_core.tasks import infer_task, parse_task
from lmserve_core.tokenizer import Encoding

# --- task inference -----------------------------------------------------------------------


def test_rerank_is_inferred_for_one_label_classifiers_and_cross_encoders() -> None:
    arch = ["BertForSequenceClassification"]
    assert infer_task(arch, is_sentence_transformer=False, num_labels=1) is Task.rerank
    assert infer_task(arch, is_sentence_transformer=False, num_labels=2) is (
        Task.sequence_classification
    )
    assert infer_task(arch, is_sentence_transformer=True, is_cross_encoder=True) is Task.rerank
    assert infer_task(["BertModel"], is_sentence_transformer=True) is Task.text_embedding
    assert parse_task("score") is parse_task("rerank") is Task.rerank


def _write(path: Path, name: str, data: Any) -> None:
    (path / name).write_text(json.dumps(data))


def test_cross_encoder_folders_of_every_sentence_transformers_version(tmp_path: Path) -> None:
    base = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    v5 = tmp_path / "v5"
    v5.mkdir()
    _write(v5, "modules.json", [{"type": "sentence_transformers.base.modules.Transformer"}])
    _write(v5, "config_sentence_transformers.json",
           {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity"})  # fmt: skip
    assert is_cross_encoder(v5, base) and infer_model_task(v5, base) is Task.rerank
    assert cross_encoder_activation(v5, base) == "identity"
    v4 = {**base, "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Tanh"}}
    assert is_cross_encoder(tmp_path, v4) and cross_encoder_activation(tmp_path, v4) == "tanh"
    old = {**base, "sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"}
    assert is_cross_encoder(tmp_path, old) and cross_encoder_activation(tmp_path, old) == "sigmoid"
    assert not is_cross_encoder(tmp_path, base)
    assert cross_encoder_activation(tmp_path, base) == "sigmoid"  # sentence-transformers' default
    weird = {**base, "sentence_transformers": {"activation_fn": "my.module.Softplus"}}
    with pytest.raises(ConfigurationError, match="Softplus"):
        cross_encoder_activation(tmp_path, weird)


def test_matryoshka_declarations(tmp_path: Path) -> None:
    assert matryoshka_dimensions(tmp_path, {}) is None
    assert matryoshka_dimensions(tmp_path, {"matryoshka_dimensions": [64, 16, 32, 16]}) == (
        16, 32, 64)  # fmt: skip
    assert matryoshka_dimensions(tmp_path, {"is_matryoshka": True}) == ()
    _write(tmp_path, "config_sentence_transformers.json", {"matryoshka_dimensions": [8]})
    assert matryoshka_dimensions(tmp_path, {}) == (8,)


# --- handlers -----------------------------------------------------------------------------


def _request(n: int, params: RequestParams | None = None) -> EncodedRequest:
    enc = Encoding([2, 5, 3], [0, 0, 0], [(0, 0)] * 3, [1, 0, 1], [None, 0, None])
    return EncodedRequest(["x"] * n, [enc] * n, params or RequestParams())


def _ctx(**info: Any) -> TaskContext:
    return TaskContext(tokenizer=None, info=ModelInfo(**info), options=EncoderOptions())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "activation,expected",
    [("sigmoid", [0.5, 0.880797]), ("identity", [0.0, 2.0]), ("tanh", [0.0, 0.964028])],
)
def test_rerank_applies_the_cross_encoders_activation(
    activation: str, expected: list[float]
) -> None:
    logits = np.array([[0.0], [2.0]], dtype=np.float32)
    result = Rerank().postprocess(logits, _request(2), _ctx(score_activation=activation))
    assert result.predictions == pytest.approx(expected, abs=1e-6)
    (out,) = result.outputs
    assert (out.datatype, out.shape) == ("FP32", [2])
    # A backend that squeezes the label axis gives the same, and raw_scores the logit.
    squeezed = Rerank().postprocess(logits[:, 0], _request(2), _ctx(score_activation=activation))
    assert squeezed.predictions == result.predictions
    raw = Rerank().postprocess(logits, _request(2, RequestParams(raw_scores=True)), _ctx())
    assert raw.predictions == [0.0, 2.0]


def test_rerank_refuses_label_output() -> None:
    with pytest.raises(InvalidInput, match="labels"):
        Rerank().validate(_request(1, RequestParams(labels=True)), _ctx())


def test_embedding_dimensions_cut_then_normalise() -> None:
    hidden = np.array([[3.0, 4.0, 12.0, 0.0]], dtype=np.float32)  # already pooled, [N, D]
    ctx = _ctx(hidden_size=4, matryoshka_dimensions=(2,))
    cut = TextEmbedding().postprocess(hidden, _request(1, RequestParams(dimensions=2)), ctx)
    assert cut.predictions == [pytest.approx([0.6, 0.8])]
    raw = TextEmbedding().postprocess(hidden, _request(1, RequestParams(normalize=False)), ctx)
    assert raw.predictions == [[3.0, 4.0, 12.0, 0.0]]
    full = TextEmbedding().postprocess(hidden, _request(1), ctx)
    assert np.linalg.norm(full.predictions[0]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "declared,dims,ok",
    [(None, 4, True), (None, 2, False), ((), 3, True), ((), 5, False), ((2,), 2, True),
     ((2,), 3, False)],
)  # fmt: skip
def test_embedding_dimensions_the_model_can_give(
    declared: tuple[int, ...] | None, dims: int, ok: bool
) -> None:
    ctx = _ctx(hidden_size=4, matryoshka_dimensions=declared)
    request = _request(1, RequestParams(dimensions=dims))
    if ok:
        TextEmbedding().validate(request, ctx)
    else:
        with pytest.raises(InvalidInput) as info:
            TextEmbedding().validate(request, ctx)
        assert info.value.param == "dimensions"


# --- request inputs, pairing, ranking -----------------------------------------------------


def test_inputs_as_strings_objects_and_text_parts() -> None:
    assert input_text("a", "query") == "a"
    assert input_text({"text": "b"}, "query") == "b"
    assert input_text({"content": [{"type": "text", "text": "c"}]}, "query") == "c"
    assert input_texts(["a", {"text": "b"}], "documents") == ["a", "b"]
    assert input_texts("a", "documents") == ["a"]
    for bad, param in (("", "query"), ({"content": [{"type": "image_url"}]}, "query"),
                       (3, "query"), ({"text": "a", "other": 1}, "query")):  # fmt: skip
        with pytest.raises(InvalidInput) as info:
            input_text(bad, param)
        assert info.value.param == param
    with pytest.raises(InvalidInput) as info:
        input_texts(["a", ""], "documents")
    assert info.value.param == "documents[1]"
    with pytest.raises(InvalidInput):
        input_texts([], "documents")


def test_pairing_follows_vllms_rules() -> None:
    names = ("text_1", "text_2")
    assert pair_up(["q"], ["a", "b"], names) == [("q", "a"), ("q", "b")]
    assert pair_up(["q", "r"], ["a", "b"], names) == [("q", "a"), ("r", "b")]
    with pytest.raises(InvalidInput) as info:
        pair_up(["q", "r"], ["a", "b", "c"], names)
    assert info.value.param == "text_2"


def test_ranking_best_first_ties_in_order_and_top_n() -> None:
    scores = [0.1, 0.9, 0.5, 0.9]
    assert ranking(scores, 0) == [1, 3, 2, 0]
    assert ranking(scores, 2) == [1, 3]
    assert ranking(scores, 10) == [1, 3, 2, 0]


def test_cosine_scores() -> None:
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    assert cosine_scores(vectors, [0, 0], [1, 2]) == pytest.approx([1.0, 0.0])


def test_pairs_as_lists_or_text_pair_objects() -> None:
    assert check_pairs([["q", "d"], {"text": "q", "text_pair": "e"}]) == [("q", "d"), ("q", "e")]
    for bad in ([], ["q"], [["q"]], [["q", 1]], [["", "d"]]):
        with pytest.raises(InvalidInput):
            check_pairs(bad)


# --- per-request truncation ---------------------------------------------------------------


def test_truncation_cuts_either_side_and_checks_the_limit() -> None:
    enc = Encoding([2, 5, 6, 7, 3], [0] * 5, [(0, 0)] * 5, [1, 0, 0, 0, 1], [None, 0, 1, 2, None])
    assert Truncation(3, "left").cut(enc, 3).ids == [6, 7, 3]
    assert Truncation(3, "right").cut(enc, 3).ids == [2, 5, 6]
    assert Truncation(3, "right").cut(enc, 3).word_ids == [None, 0, 1]
    assert Truncation(-1).limit(64) == 64 and Truncation(8).limit(64) == 8
    with pytest.raises(InvalidInput) as info:
        Truncation(65).limit(64)
    assert info.value.param == "truncate_prompt_tokens"
