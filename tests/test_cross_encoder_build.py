"""The tiny cross-encoder the rerank tests serve is a real sentence-transformers
``CrossEncoder`` and scores as ``cross_encoder`` promises, loaded fresh from its folder."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from _support import cross_encoder, tiny_models, verified_build
from _support.cross_encoder import (
    LONG_PAIR_TOKENS,
    LONG_PASSAGE,
    LONG_PASSAGE_QUERY,
    PREDICT_TOLERANCE,
    RERANK_QUERIES,
    all_passages,
    cross_encoder_path,
    plain_scores,
    relevant_passages,
)
from _support.tiny_models import MAX_LENGTH, VERIFIED_FILE, Attempt, TinyModelNotLearned

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; two on a busy two-core machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def path() -> Path:
    return cross_encoder_path()


@pytest.fixture(scope="module")
def model(path: Path) -> CrossEncoder:
    return CrossEncoder(str(path), device="cpu", local_files_only=True)


def _scores(model: CrossEncoder, query: str, passages: list[str]) -> list[float]:
    return [float(s) for s in model.predict([(query, p) for p in passages])]


def test_folder_is_a_sentence_transformers_cross_encoder(path: Path, model: CrossEncoder) -> None:
    for name in (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        VERIFIED_FILE,
    ):
        assert (path / name).is_file(), name
    st_config = json.loads((path / "config_sentence_transformers.json").read_text())
    assert st_config["model_type"] == "CrossEncoder"
    assert st_config["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
    assert isinstance(model.activation_fn, torch.nn.Sigmoid)
    assert model.num_labels == 1 and model.max_seq_length == MAX_LENGTH
    assert path.name == f"cross-encoder-rerank-{cross_encoder.cross_encoder_hash()}"
    assert cross_encoder_path() == path  # cached: the same verified folder again


def test_config_is_a_one_label_bert(path: Path) -> None:
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.num_labels == 1 and config.id2label == {0: "LABEL_0"}
    assert config.problem_type is None  # transformers 5 refuses single_label with one label
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 2, 2)
    assert config.max_position_embeddings == MAX_LENGTH
    raw = json.loads((path / "config.json").read_text())
    assert raw.get("problem_type") is None


def test_tokenizer_lowercases_and_encodes_pairs_by_segment(path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.is_fast and tokenizer.model_max_length == MAX_LENGTH
    assert (
        tokenizer("PARIS Is The Capital")["input_ids"]
        == tokenizer("paris is the capital")["input_ids"]
    )
    query, passage = next(iter(RERANK_QUERIES.items()))[0], "Paris is the capital of France."
    pair = tokenizer(query, passage)
    n_query = len(tokenizer(query)["input_ids"])  # [CLS] query [SEP]
    n_passage = len(tokenizer(passage)["input_ids"]) - 1  # passage [SEP]
    assert pair["token_type_ids"] == [0] * n_query + [1] * n_passage
    assert pair["input_ids"].count(tokenizer.sep_token_id) == 2
    assert tokenizer.unk_token_id not in pair["input_ids"]


def test_relevant_passages_score_above_irrelevant(model: CrossEncoder) -> None:
    for query, (relevant, irrelevant) in RERANK_QUERIES.items():
        good, bad = _scores(model, query, relevant), _scores(model, query, irrelevant)
        assert min(good) > 0.5 > max(bad), (query, good, bad)
        # The other queries' relevant passages (hard negatives) score low too.
        others = [p for p in all_passages() if p not in relevant_passages(query)]
        assert min(good) > 0.5 > max(_scores(model, query, others)), query


def test_predict_equals_a_plain_transformers_forward(path: Path, model: CrossEncoder) -> None:
    pairs = [(q, p) for q in RERANK_QUERIES for p in all_passages()]
    predicted = [float(s) for s in model.predict(pairs)]
    plain = plain_scores(path, pairs)
    assert max(abs(a - b) for a, b in zip(predicted, plain, strict=True)) <= PREDICT_TOLERANCE
    # The same through an explicit padded batch, as a server batches.
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype="float32").eval()
    batch = tokenizer(
        [q for q, _ in pairs],
        [p for _, p in pairs],
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        batched = hf(**batch).logits[:, 0].sigmoid().tolist()
    assert max(abs(a - b) for a, b in zip(predicted, batched, strict=True)) <= PREDICT_TOLERANCE


def test_rank_puts_the_relevant_passages_first(model: CrossEncoder) -> None:
    for query, (relevant, irrelevant) in RERANK_QUERIES.items():
        passages = relevant + irrelevant
        random.Random(query).shuffle(passages)
        ranked = model.rank(query, passages)
        top = {passages[r["corpus_id"]] for r in ranked[: len(relevant)]}
        assert top == set(relevant), (query, ranked)
        scores = [r["score"] for r in ranked]
        assert scores == sorted(scores, reverse=True)


def test_long_passage_is_truncated_and_still_relevant(path: Path, model: CrossEncoder) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)
    untruncated = tokenizer(LONG_PASSAGE_QUERY, LONG_PASSAGE)["input_ids"]
    assert len(untruncated) == LONG_PAIR_TOKENS > MAX_LENGTH
    truncated = tokenizer(LONG_PASSAGE_QUERY, LONG_PASSAGE, truncation=True)
    assert len(truncated["input_ids"]) == MAX_LENGTH
    # Longest first: the query is whole, the passage lost its tail.
    n_query = len(tokenizer(LONG_PASSAGE_QUERY)["input_ids"])
    assert truncated["input_ids"][:n_query] == untruncated[:n_query]
    irrelevant = RERANK_QUERIES[LONG_PASSAGE_QUERY][1]
    (long_score,) = _scores(model, LONG_PASSAGE_QUERY, [LONG_PASSAGE])
    assert long_score > 0.5 > max(_scores(model, LONG_PASSAGE_QUERY, irrelevant))
    assert abs(long_score - plain_scores(path, [(LONG_PASSAGE_QUERY, LONG_PASSAGE)])[0]) <= 1e-5


def test_verified_record_and_checks(path: Path) -> None:
    record = json.loads((path / VERIFIED_FILE).read_text())
    assert record["model"] == "rerank" and record["attempt"] >= 1
    assert "sentence-transformers" in record["versions"]
    assert cross_encoder.verify(path) == []


def test_failed_attempts_train_again_then_name_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache code the builder runs in (``verified_build``), with stand-in builds."""
    monkeypatch.setattr(tiny_models, "CACHE_DIR", tmp_path)
    kind = verified_build.Kind(
        prefix="cross-encoder",
        description="cross-encoder",
        record_key="model",
        digest=lambda: "0123456789ab",
        versions=dict,
    )
    stale = tmp_path / "cross-encoder-third-ba9876543210"
    stale.mkdir()
    tried: list[Attempt] = []

    def third_time_lucky(directory: Path, attempt: Attempt) -> list[str]:
        tried.append(attempt)
        return [] if attempt.number == 3 else [f"miss {attempt.number}"]

    built = verified_build.cached(kind, "third", third_time_lucky)
    assert built.name == "cross-encoder-third-0123456789ab" and not stale.exists()
    assert [a.number for a in tried] == [1, 2, 3]
    record = json.loads((built / VERIFIED_FILE).read_text())
    assert record["model"] == "third" and record["attempt"] == 3 and record["seed"] == tried[2].seed
    assert [f.split(":")[0] for f in record["failed_attempts"]] == [
        "attempt 1 (seed 0, x1.0 epochs)",
        "attempt 2 (seed 1, x1.0 epochs)",
    ]

    def never(directory: Path, attempt: Attempt) -> list[str]:
        return ["relevant below irrelevant"]

    with pytest.raises(
        TinyModelNotLearned, match=r"cross-encoder 'never'.*relevant below irrelevant"
    ):
        verified_build.cached(kind, "never", never)
    # Only finished folders and lock files remain: every build folder was renamed or removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cross-encoder-never.lock",
        ".cross-encoder-third.lock",
        built.name,
    ]
