"""End to end: rerank and score (vLLM's routes, KServe's /openai/v1/rerank, V1/V2 pairs) on a
trained tiny cross-encoder and on an embedding model, checked against sentence-transformers
in-process, vLLM's own server, and the Cohere SDK."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _support.cross_encoder import (
    LONG_PAIR_TOKENS,
    LONG_PASSAGE,
    LONG_PASSAGE_QUERY,
    RERANK_QUERIES,
    cross_encoder_path,
)
from _support.servers import ServerProcess
from _support.tiny_models import model_path
from lmserve_core.builtin_models import locate_builtin

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
QUERY = "What is the capital of France?"
RELEVANT, IRRELEVANT = RERANK_QUERIES[QUERY]
DOCUMENTS = [IRRELEVANT[0], RELEVANT[0], IRRELEVANT[1], RELEVANT[1], IRRELEVANT[2]]


@pytest.fixture(scope="module")
def ce_dir() -> Path:
    return cross_encoder_path()


@pytest.fixture(scope="module")
def reranker(server_pool: Pool, ce_dir: Path) -> ServerProcess:
    # No --task: a sentence-transformers CrossEncoder folder is inferred as a reranker.
    return server_pool("--model_dir", str(ce_dir), "--model_name", "ce")


@pytest.fixture(scope="module")
def cross_encoder(ce_dir: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(ce_dir), device="cpu")


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, (path, r.text)
    result: dict[str, Any] = r.json()
    return result


def test_rerank_scores_equal_cross_encoder_predict(
    reranker: ServerProcess, cross_encoder: Any
) -> None:
    for query, (relevant, irrelevant) in RERANK_QUERIES.items():
        documents = irrelevant + relevant
        out = post(reranker, "/rerank", {"model": "ce", "query": query, "documents": documents})
        expected = cross_encoder.predict([(query, d) for d in documents])
        by_index = {r["index"]: r for r in out["results"]}
        assert sorted(by_index) == list(range(len(documents)))
        got = [by_index[i]["relevance_score"] for i in range(len(documents))]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # Best first; every relevant passage above every irrelevant one (the model was trained so).
        ranked = [r["index"] for r in out["results"]]
        assert [r["relevance_score"] for r in out["results"]] == sorted(got, reverse=True)
        assert set(ranked[: len(relevant)]) == set(range(len(irrelevant), len(documents)))
        assert all(by_index[i]["document"] == {"text": documents[i], "multi_modal": None}
                   for i in by_index)  # fmt: skip


def test_rerank_shape_top_n_paths_and_document_objects(reranker: ServerProcess) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    outs = [post(reranker, path, body)
            for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/openai/v1/rerank")]  # fmt: skip
    first = outs[0]
    assert set(first) == {"id", "model", "usage", "results"}
    assert first["model"] == "ce"  # 'model' left out: the served model
    assert [r["index"] for r in first["results"]] == [1, 3] or [
        r["index"] for r in first["results"]
    ] == [3, 1]
    assert all([r["index"] for r in o["results"]] == [r["index"] for r in first["results"]]
               for o in outs)  # fmt: skip
    assert first["usage"]["prompt_tokens"] == first["usage"]["total_tokens"] > 0
    # Cohere/Jina document objects and vLLM's text content parts read the same text.
    objects = post(reranker, "/rerank", {
        "query": {"text": QUERY},
        "documents": [{"text": d} for d in DOCUMENTS[:2]]
        + [{"content": [{"type": "text", "text": DOCUMENTS[2]}]}],
        "return_documents": False,
    })  # fmt: skip
    plain = post(reranker, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:3]})
    assert [r["index"] for r in objects["results"]] == [r["index"] for r in plain["results"]]
    assert all("document" not in r for r in objects["results"])
    # top_n above the number of documents returns them all (vLLM's rule).
    assert len(post(reranker, "/rerank", {"query": QUERY, "documents": DOCUMENTS[:2],
                                          "top_n": 10})["results"]) == 2  # fmt: skip


def test_use_activation_false_gives_the_logit(reranker: ServerProcess, cross_encoder: Any) -> None:
    out = post(reranker, "/score", {"text_1": QUERY, "text_2": DOCUMENTS, "use_activation": False})
    probabilities = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    logits = [math.log(p / (1 - p)) for p in probabilities]
    np.testing.assert_allclose([d["score"] for d in out["data"]], logits, atol=1e-4)


def test_score_one_to_one_one_to_many_and_pairwise(
    reranker: ServerProcess, cross_encoder: Any
) -> None:
    queries = list(RERANK_QUERIES)[:2]
    docs = [RERANK_QUERIES[queries[0]][0][0], RERANK_QUERIES[queries[1]][1][0]]
    one = post(reranker, "/score", {"text_1": queries[0], "text_2": docs[0]})
    many = post(reranker, "/score", {"text_1": queries[0], "text_2": docs})
    pairwise = post(reranker, "/v1/score", {"queries": queries, "documents": docs})
    items = post(reranker, "/openai/v1/score", {"queries": [queries[0]], "items": docs})
    assert set(one) == {"id", "object", "created", "model", "data", "usage"}
    assert one["object"] == "list" and one["data"][0]["object"] == "score"
    assert one["usage"]["completion_tokens"] == 0
    assert [d["score"] for d in one["data"]] == pytest.approx(
        cross_encoder.predict([(queries[0], docs[0])]).tolist(), abs=1e-5)  # fmt: skip
    assert [d["score"] for d in many["data"]] == pytest.approx(
        cross_encoder.predict([(queries[0], d) for d in docs]).tolist(), abs=1e-5)  # fmt: skip
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(
        cross_encoder.predict(list(zip(queries, docs, strict=True))).tolist(), abs=1e-5
    )
    assert [d["score"] for d in items["data"]] == [d["score"] for d in many["data"]]
    assert [d["index"] for d in many["data"]] == [0, 1]


def test_kserve_v1_and_v2_take_pairs(reranker: ServerProcess, cross_encoder: Any) -> None:
    pairs = [[QUERY, d] for d in DOCUMENTS[:3]]
    expected = cross_encoder.predict([tuple(p) for p in pairs]).tolist()
    v1 = post(reranker, "/v1/models/ce:predict", {"instances": pairs})
    assert v1["predictions"] == pytest.approx(expected, abs=1e-5)
    dicts = post(reranker, "/v1/models/ce:predict",
                 {"instances": [{"text": q, "text_pair": d} for q, d in pairs]})  # fmt: skip
    assert dicts["predictions"] == pytest.approx(expected, abs=1e-5)
    flat = [text for pair in pairs for text in pair]
    v2 = post(reranker, "/v2/models/ce/infer", {"inputs": [
        {"name": "pairs", "shape": [3, 2], "datatype": "BYTES", "data": flat}]})  # fmt: skip
    (tensor,) = v2["outputs"]
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [3]
    assert tensor["data"] == pytest.approx(expected, abs=1e-5)
    with reranker.client() as c:
        meta = c.get("/v2/models/ce").json()
    assert meta["parameters"]["task"] == "rerank"
    assert meta["outputs"] == [{"name": "output-0", "datatype": "FP32", "shape": [-1]}]


def test_a_long_pair_is_cut_document_first(reranker: ServerProcess, ce_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ce_dir)
    full = tokenizer(LONG_PASSAGE_QUERY, LONG_PASSAGE)["input_ids"]
    assert len(full) == LONG_PAIR_TOKENS > 64
    cut = tokenizer(LONG_PASSAGE_QUERY, LONG_PASSAGE, truncation="only_second", max_length=64,
                    return_tensors="pt")  # fmt: skip
    query_tokens = len(tokenizer(LONG_PASSAGE_QUERY)["input_ids"])
    assert cut["input_ids"].shape[1] == 64
    assert cut["input_ids"][0, :query_tokens].tolist() == full[:query_tokens]  # query whole
    model = AutoModelForSequenceClassification.from_pretrained(ce_dir).eval()
    with torch.no_grad():
        expected = float(model(**cut).logits[0, 0].sigmoid())
    out = post(reranker, "/score", {"text_1": LONG_PASSAGE_QUERY, "text_2": LONG_PASSAGE})
    assert out["data"][0]["score"] == pytest.approx(expected, abs=1e-5)
    assert out["usage"]["prompt_tokens"] == 64
    # truncate_prompt_tokens: a tighter limit, still cut document first.
    short = post(reranker, "/score", {"text_1": LONG_PASSAGE_QUERY, "text_2": LONG_PASSAGE,
                                      "truncate_prompt_tokens": 20})  # fmt: skip
    assert short["usage"]["prompt_tokens"] == 20
    with reranker.client() as c:
        r = c.post("/rerank", json={"query": LONG_PASSAGE_QUERY, "documents": [LONG_PASSAGE],
                                    "truncate": False})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate", r.text
        r = c.post(
            "/v1/models/ce:predict",
            json={
                "instances": [[LONG_PASSAGE_QUERY, LONG_PASSAGE]],
                "parameters": {"truncate": False},
            },
        )
        assert r.status_code == 400, r.text


def test_bad_rerank_requests_are_clear_400s_and_404s(reranker: ServerProcess) -> None:
    cases: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("/rerank", {"query": QUERY, "documents": []}, 400, "documents"),
        ("/rerank", {"query": QUERY, "documents": ["ok", ""]}, 400, "documents[1]"),
        ("/rerank", {"documents": ["a"]}, 400, "query"),
        ("/rerank", {"query": "", "documents": ["a"]}, 400, "query"),
        ("/rerank", {"query": QUERY, "documents": ["a"], "top_n": -1}, 400, "top_n"),
        ("/rerank", {"query": QUERY, "documents": ["a"], "max_tokens_per_doc": 8}, 400,
         "max_tokens_per_doc"),
        ("/rerank", {"query": QUERY, "documents": [{"content": [{"type": "image_url",
         "image_url": {"url": "http://x"}}]}]}, 400, "documents[0]"),
        ("/rerank", {"model": "nope", "query": QUERY, "documents": ["a"]}, 404, None),
        ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
        ("/score", {"text_1": "a"}, 400, None),
    ]  # fmt: skip
    with reranker.client() as c:
        for path, body, status, param in cases:
            r = c.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            if param is not None:
                assert error["param"] == param, (body, error)
        # Labels are for classifiers: a reranker says so rather than ignoring the parameter.
        r = c.post("/v1/models/ce:predict",
                   json={"instances": [[QUERY, "a"]], "parameters": {"output": "labels"}})  # fmt: skip
        assert r.status_code == 400
        r = c.post("/v1/models/ce:predict", json={"instances": ["not a pair"]})
        assert r.status_code == 400 and "pair" in r.json()["error"]


def test_rerank_on_a_generative_or_classifier_model_is_a_400(server_pool: Pool) -> None:
    for args in (["--model_dir", str(model_path("llama")), "--backend", "huggingface"],
                 ["--model_dir", str(model_path("sentiment"))]):  # fmt: skip
        server = server_pool(*args)
        with server.client() as c:
            r = c.post("/rerank", json={"query": "a", "documents": ["b"]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "model"


# --- an embedding model ranks by cosine similarity (vLLM's bi-encoder scoring) ------------


def test_embedding_model_reranks_by_cosine(server_pool: Pool) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import cos_sim

    server = server_pool("--model_id", "all-minilm-l6-v2")
    model = SentenceTransformer(str(locate_builtin("all-minilm-l6-v2")), device="cpu")
    expected = cos_sim(model.encode([QUERY]), model.encode(DOCUMENTS))[0].tolist()
    out = post(server, "/rerank", {"query": QUERY, "documents": DOCUMENTS})
    by_index = {r["index"]: r["relevance_score"] for r in out["results"]}
    assert [by_index[i] for i in range(len(DOCUMENTS))] == pytest.approx(expected, abs=1e-5)
    assert out["results"][0]["index"] == int(np.argmax(expected))
    score = post(server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS})
    assert [d["score"] for d in score["data"]] == pytest.approx(expected, abs=1e-5)


# --- real clients -------------------------------------------------------------------------


def test_cohere_sdk_v1_and_v2_rerank(reranker: ServerProcess, cross_encoder: Any) -> None:
    import cohere
    import httpx

    expected = cross_encoder.predict([(QUERY, d) for d in DOCUMENTS])
    best = [int(i) for i in np.argsort(-expected)[:2]]
    # The SDK's own HTTP client is never closed; hand it one that is.
    with httpx.Client(timeout=60) as http:
        v2 = cohere.ClientV2(api_key="unused", base_url=reranker.url, httpx_client=http)
        answer = v2.rerank(model="ce", query=QUERY, documents=DOCUMENTS, top_n=2)
        v1 = cohere.Client(api_key="unused", base_url=reranker.url, httpx_client=http)
        answer1 = v1.rerank(model="ce", query=QUERY, documents=DOCUMENTS, top_n=2,
                            return_documents=True)  # fmt: skip
    # The two relevant passages, best first (their order is the model's, near-tied).
    assert {r.index for r in answer.results} == set(best)
    by_index = {r.index: r.relevance_score for r in answer.results}
    assert [by_index[i] for i in best] == pytest.approx(expected[best].tolist(), abs=1e-5)
    assert {r.index for r in answer1.results} == set(best)
    assert answer1.results[0].document is not None
    assert answer1.results[0].document.text == DOCUMENTS[answer1.results[0].index]


def test_kserve_documented_rerank_request(reranker: ServerProcess) -> None:
    # KServe's rerank example, as its docs send it to /openai/v1/rerank.
    body = {"model": "ce", "query": QUERY, "documents": DOCUMENTS[:4]}
    out = post(reranker, "/openai/v1/rerank", body)
    assert out["model"] == "ce"
    assert {r["index"] for r in out["results"]} == {0, 1, 2, 3}
    assert out["results"][0]["index"] in (1, 3)


# --- vLLM's own server as the reference ---------------------------------------------------


@pytest.fixture(scope="module")
def vllm_reranker(ce_dir: Path) -> Iterator[ServerProcess]:
    from _support.vllm_reference import start_vllm_reference

    server = start_vllm_reference(ce_dir, "--runner", "pooling")
    try:
        yield server
    finally:
        server.stop()


def test_rerank_and_score_equal_vllms(server_pool: Pool, ce_dir: Path,
                                      vllm_reranker: ServerProcess) -> None:  # fmt: skip
    ours = server_pool("--model_dir", str(ce_dir))  # served as "model", as the reference
    # top_n 2: the two relevant passages; the irrelevant ones are near-ties (saturated
    # scores, logits 2e-4 apart), so their order is float noise between engines.
    rerank = {"model": "model", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    score = {"model": "model", "text_1": QUERY, "text_2": DOCUMENTS}
    theirs_rerank = post(vllm_reranker, "/rerank", rerank)
    mine_rerank = post(ours, "/rerank", rerank)
    assert set(mine_rerank) == set(theirs_rerank)
    mine_by_index = {r["index"]: r for r in mine_rerank["results"]}
    theirs_by_index = {r["index"]: r for r in theirs_rerank["results"]}
    assert set(mine_by_index) == set(theirs_by_index) == {1, 3}
    for i, theirs in theirs_by_index.items():
        assert mine_by_index[i]["relevance_score"] == pytest.approx(
            theirs["relevance_score"], abs=1e-5)  # fmt: skip
        assert mine_by_index[i]["document"] == theirs["document"]
    assert mine_rerank["usage"] == theirs_rerank["usage"]
    theirs_score, mine_score = post(vllm_reranker, "/score", score), post(ours, "/score", score)
    assert set(mine_score) == set(theirs_score)
    assert [d["score"] for d in mine_score["data"]] == pytest.approx(
        [d["score"] for d in theirs_score["data"]], abs=1e-5)  # fmt: skip
    assert mine_score["usage"]["prompt_tokens"] == theirs_score["usage"]["prompt_tokens"]
