"""End to end: real server processes, real trained tiny models, real HTTP (docs/behaviour.md §3-§4)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import numpy as np
import pytest

from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]


def v2_text(texts: list[str], **extra: object) -> dict[str, object]:
    return {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        **extra,
    }


def predict(server: ServerProcess, instances: object, **extra: object) -> dict[str, object]:
    with server.client() as c:
        r = c.post("/v1/models/model:predict", json={"instances": instances, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def infer(
    server: ServerProcess, body: dict[str, object], model: str = "model"
) -> dict[str, object]:
    with server.client() as c:
        r = c.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- sequence classification ----------------------------------------------------------


@pytest.fixture(scope="module")
def sentiment(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("sentiment")))


def test_sentiment_v1_argmax_and_labels(sentiment: ServerProcess) -> None:
    assert predict(sentiment, ["I love this", "I hate this"]) == {"predictions": [1, 0]}
    labelled = predict(sentiment, ["I love this", "I hate this"], parameters={"output": "labels"})
    (love,), (hate,) = labelled["predictions"]
    assert love["label"] == "POSITIVE" and love["score"] > 0.9
    assert hate["label"] == "NEGATIVE" and hate["score"] > 0.9


def test_sentiment_v2_int64_and_labels(sentiment: ServerProcess) -> None:
    out = infer(sentiment, v2_text(["I love this", "I hate this"]))
    assert out["model_name"] == "model"
    assert out["outputs"] == [
        {"name": "output-0", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    ]
    out = infer(sentiment, v2_text(["I love this"], parameters={"output": "labels", "top_k": 2}))
    (tensor,) = out["outputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [1]
    labels = json.loads(tensor["data"][0])
    assert [item["label"] for item in labels] == ["POSITIVE", "NEGATIVE"]
    assert labels[0]["score"] + labels[1]["score"] == pytest.approx(1.0, abs=1e-5)


def test_sentiment_probabilities(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("sentiment")), "--return_probabilities")
    (probs,) = predict(server, ["I love this"])["predictions"]
    assert set(probs) == {"0", "1"}
    assert probs["1"] > 0.9 and probs["0"] + probs["1"] == pytest.approx(1.0, abs=2e-4)
    assert all(round(p, 4) == p for p in probs.values())
    out = infer(server, v2_text(["I hate this", "I love this"]))
    (tensor,) = out["outputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [2]
    assert json.loads(tensor["data"][0])["0"] > 0.9


def test_sentiment_raw_logits(server_pool: Pool) -> None:
    server = server_pool("--model-dir", str(model_path("sentiment")), "--return-raw-logits")
    (logits,) = predict(server, ["I love this"])["predictions"]
    assert len(logits) == 2 and logits[1] > logits[0]
    (tensor,) = infer(server, v2_text(["a", "b", "c"]))["outputs"]
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [3, 2]


# --- token classification ---------------------------------------------------------------

ALICE = "Alice lives in Paris and works at Google"


@pytest.fixture(scope="module")
def ner(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("ner")))


def test_ner_v1_ids_one_list_in_a_list(ner: ServerProcess) -> None:
    (pred,) = predict(ner, [ALICE])["predictions"]
    assert len(pred) == 1 and all(isinstance(i, int) for i in pred[0])
    # [CLS] ... [SEP]: at least one token per word plus two special tokens.
    assert len(pred[0]) >= len(ALICE.split()) + 2


def test_ner_entities_with_offsets(ner: ServerProcess) -> None:
    (entities,) = predict(ner, [ALICE], parameters={"output": "labels"})["predictions"]
    found = {(e["entity_group"], e["word"]) for e in entities}
    assert found == {("PER", "Alice"), ("LOC", "Paris"), ("ORG", "Google")}
    for e in entities:
        assert ALICE[e["start"] : e["end"]] == e["word"]
    (tokens,) = predict(
        ner, [ALICE], parameters={"output": "labels", "aggregation_strategy": "none"}
    )["predictions"]
    assert {t["entity"] for t in tokens} >= {"B-PER", "B-LOC", "B-ORG"}
    assert all({"score", "index", "word", "start", "end"} <= set(t) for t in tokens)


def test_ner_v2_shape_is_n_1_l(ner: ServerProcess) -> None:
    (tensor,) = infer(ner, v2_text([ALICE, "Bob"]))["outputs"]
    n, one, length = tensor["shape"]
    assert (n, one) == (2, 1) and tensor["datatype"] == "INT64"
    assert len(tensor["data"]) == n * length


def test_ner_no_special_tokens_and_max_length(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("ner")), "--disable_special_tokens",
                         "--max_length", "6", "--return_offsets_mapping")  # fmt: skip
    (pred,) = predict(server, ["Alice"])["predictions"]
    assert len(pred["predictions"][0]) == 1  # no [CLS]/[SEP]
    assert pred["offset_mapping"] == [[0, 5]]
    (long,) = predict(server, [ALICE])["predictions"]
    assert len(long["predictions"][0]) == 6  # truncated to --max_length
    with server.client() as c:
        r = c.post("/v1/models/model:predict",
                   json={"instances": [ALICE], "parameters": {"truncate": False}})  # fmt: skip
    assert r.status_code == 400 and "truncate" in r.json()["error"]
    out = infer(server, v2_text(["Alice lives"]))
    names = [o["name"] for o in out["outputs"]]
    assert names == ["output-0", "offset_mapping"]


# --- fill mask ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_dir", str(model_path("masked_lm")))


def test_fill_mask_paris(masked: ServerProcess) -> None:
    out = predict(masked, ["The capital of France is [MASK].", "the capital of germany is [MASK]."])
    assert out == {"predictions": ["paris", "berlin"]}
    (tensor,) = infer(masked, v2_text(["The capital of France is [MASK]."]))["outputs"]
    assert tensor == {"name": "output-0", "datatype": "BYTES", "shape": [1], "data": ["paris"]}


def test_fill_mask_labels(masked: ServerProcess) -> None:
    (top,) = predict(masked, ["The capital of France is [MASK]."],
                     parameters={"output": "labels", "top_k": 3})["predictions"]  # fmt: skip
    assert len(top) == 3 and top[0]["token_str"] == "paris"
    assert top[0]["sequence"] == "the capital of france is paris."
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert isinstance(top[0]["token"], int)


def test_fill_mask_without_mask_is_400(masked: ServerProcess) -> None:
    with masked.client() as c:
        r = c.post("/v1/models/model:predict", json={"instances": ["no mask here"]})
    assert r.status_code == 400
    assert "[MASK]" in r.json()["error"]


def test_fill_mask_probabilities(server_pool: Pool) -> None:
    server = server_pool("--model_dir", str(model_path("masked_lm")), "--return_probabilities")
    (per_mask,) = predict(server, ["The capital of France is [MASK]."])["predictions"]
    (probs,) = per_mask
    assert len(probs) == 5
    assert all(isinstance(p, float) for p in probs.values())
    with server.client() as c:
        vocab_check = c.post(
            "/v1/models/model:predict",
            json={
                "instances": ["The capital of France is [MASK]."],
                "parameters": {"output": "labels", "top_k": 1},
            },
        )
    paris_id = str(vocab_check.json()["predictions"][0][0]["token"])
    assert max(probs, key=probs.get) == paris_id


# --- embeddings -------------------------------------------------------------------------------

EXAMPLE = "This is an example sentence."
EXPECTED_PREFIX = [0.0981246, 0.0678127, 0.0625231]


@pytest.fixture(scope="module")
def minilm(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_id", "all-minilm-l6-v2", "--model_name", "minilm")


def test_minilm_v1_v2_openai_agree(minilm: ServerProcess) -> None:
    with minilm.client() as c:
        v1 = c.post("/v1/models/minilm:predict", json={"instances": [EXAMPLE]}).json()
        v2 = c.post("/v2/models/minilm/infer", json=v2_text([EXAMPLE])).json()
        oa = c.post("/openai/v1/embeddings", json={"model": "minilm", "input": EXAMPLE}).json()
    (vec,) = v1["predictions"]
    assert len(vec) == 384
    assert vec[:3] == pytest.approx(EXPECTED_PREFIX, abs=1e-6)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    (tensor,) = v2["outputs"]
    assert tensor["datatype"] == "FP32" and tensor["shape"] == [1, 384]
    assert tensor["data"] == pytest.approx(vec, abs=1e-6)
    assert oa["object"] == "list" and oa["model"] == "minilm"
    assert oa["data"][0]["embedding"] == pytest.approx(vec, abs=1e-6)
    assert oa["usage"]["prompt_tokens"] == oa["usage"]["total_tokens"] > 0


def test_openai_embeddings_base64_and_token_ids(minilm: ServerProcess) -> None:
    import base64

    with minilm.client() as c:
        floats = c.post(
            "/openai/v1/embeddings", json={"model": "minilm", "input": [EXAMPLE, "hi"]}
        ).json()
        b64 = c.post("/openai/v1/embeddings",
                     json={"model": "minilm", "input": [EXAMPLE], "encoding_format": "base64"}).json()  # fmt: skip
        ids = c.post(
            "/openai/v1/embeddings", json={"model": "minilm", "input": minilm_ids("hi")}
        ).json()
        hi = c.post("/openai/v1/embeddings", json={"model": "minilm", "input": "hi"}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)
    # Token ids of "hi" (with [CLS]/[SEP]) embed exactly as the text does.
    assert ids["data"][0]["embedding"] == pytest.approx(hi["data"][0]["embedding"], abs=1e-5)


def minilm_ids(text: str) -> list[int]:
    from transformers import AutoTokenizer

    from lmserve_core.builtin_models import locate_builtin

    ids: list[int] = AutoTokenizer.from_pretrained(locate_builtin("all-minilm-l6-v2"))(text)[
        "input_ids"
    ]
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    return ids


def test_openai_models_and_embedding_errors(minilm: ServerProcess) -> None:
    with minilm.client() as c:
        models = c.get("/openai/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["minilm"]
        r = c.post("/openai/v1/embeddings", json={"model": "other", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        for bad in ({"model": "minilm", "input": []}, {"model": "minilm", "input": ""},
                    {"model": "minilm"}, {"model": "minilm", "input": "x", "dimensions": 3},
                    {"model": "minilm", "input": [[1, 2], "x"]}, {"model": "minilm", "input": [10**9]}):  # fmt: skip
            r = c.post("/openai/v1/embeddings", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name,mode", [("embedding_cls", "cls"), ("embedding_mean", "mean")])
def test_pooling_follows_sentence_transformers_config(
    server_pool: Pool, name: str, mode: str
) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = model_path(name)
    server = server_pool("--model_dir", str(path))
    texts = ["alpha beta gamma", "one"]
    served = np.asarray(predict(server, texts)["predictions"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = hidden[:, 0] if mode == "cls" else (hidden * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


# --- V2 binary tensor extension ---------------------------------------------------------------


def test_v2_binary_request_and_response(sentiment: ServerProcess) -> None:
    texts = [b"I love this", b"I hate this"]
    blob = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    header = json.dumps({
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "output-0", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    with sentiment.client() as c:
        r = c.post("/v2/models/model/infer", content=header + blob,
                   headers={"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    (out,) = head["outputs"]
    assert out["datatype"] == "INT64" and out["shape"] == [2]
    assert out["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(r.content[n:], dtype="<i8").tolist() == [1, 0]


# --- metadata, health, metrics ---------------------------------------------------------------


def test_metadata_health_and_listing(ner: ServerProcess) -> None:
    with ner.client() as c:
        assert c.get("/").json() == {"status": "alive"}
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/model/ready").json() == {"name": "model", "ready": True}
        assert c.get("/v1/models/model").json() == {"name": "model", "ready": True}
        assert c.get("/v1/models").json() == {"models": ["model"]}
        assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]  # what is implemented
        meta = c.get("/v2/models/model").json()
        assert meta["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1, 1, -1]}]
        assert meta["parameters"]["task"] == "token_classification"
        assert meta["parameters"]["backend"] == "huggingface"
        assert meta["parameters"]["backend_reason"]
        assert c.get("/v2/models/nope").status_code == 404
        assert c.get("/v2/models/nope/ready").status_code == 404
        c.post("/v1/models/model:predict", json={"instances": [ALICE]})
        c.post("/v1/models/model:predict", json={"instances": []})
        metrics = c.get("/metrics").text
    assert (
        'lmserve_requests_total{method="POST",model="model",route="/v1/models/{model_name}:predict",'
        'status="200"}' in metrics
    )
    assert 'status="400"' in metrics
    assert "lmserve_batch_size_bucket" in metrics
    assert 'lmserve_model_ready{model="model"} 1.0' in metrics
