"""End to end: the embeddings route's vLLM and TEI options (dimensions, truncate_prompt_tokens,
normalize, truncate, base64 byte order, add_special_tokens), checked against
sentence-transformers in-process and against vLLM's own server."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _support.servers import ServerProcess
from _support.tiny_models import model_path
from lmserve_core.builtin_models import locate_builtin

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
TEXTS = ["A man is playing a guitar.", "The weather is lovely today in the old town square."]


def embed(server: ServerProcess, **body: Any) -> dict[str, Any]:
    with server.client() as c:
        r = c.post("/openai/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def vectors(response: dict[str, Any]) -> np.ndarray:
    return np.array([d["embedding"] for d in response["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(locate_builtin("all-minilm-l6-v2"))


@pytest.fixture(scope="module")
def minilm(server_pool: Pool) -> ServerProcess:
    return server_pool("--model_id", "all-minilm-l6-v2")


@pytest.fixture(scope="module")
def sentence_transformer(minilm_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def test_model_may_be_left_out_and_usage_counts_tokens(
    minilm: ServerProcess, minilm_dir: Path, sentence_transformer: Any
) -> None:
    from transformers import AutoTokenizer

    out = embed(minilm, input=TEXTS)
    assert out["model"] == "model"
    expected = sentence_transformer.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(vectors(out), expected, atol=1e-5)
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(minilm_dir)(TEXTS)["input_ids"])
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_truncate_prompt_tokens_keeps_the_first_tokens_as_sentence_transformers(
    minilm: ServerProcess, minilm_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    short = SentenceTransformer(str(minilm_dir), device="cpu")
    short.max_seq_length = 6  # the tokenizer's own truncation: [CLS] + 4 tokens + [SEP]
    out = embed(minilm, input=TEXTS, truncate_prompt_tokens=6)
    np.testing.assert_allclose(vectors(out), short.encode(TEXTS, normalize_embeddings=True),
                               atol=1e-5)  # fmt: skip
    assert out["usage"]["prompt_tokens"] == 12
    # -1: the model's maximum (256 for MiniLM), so nothing is cut from these short texts.
    full = embed(minilm, input=TEXTS)
    np.testing.assert_allclose(vectors(embed(minilm, input=TEXTS, truncate_prompt_tokens=-1)),
                               vectors(full), atol=1e-6)  # fmt: skip


def test_truncation_side_cuts_the_token_sequence(minilm: ServerProcess, minilm_dir: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_dir)(TEXTS[1])["input_ids"]
    left = embed(minilm, input=TEXTS[1], truncate_prompt_tokens=5, truncation_side="left")
    right = embed(minilm, input=TEXTS[1], truncate_prompt_tokens=5, truncation_side="right")
    # vLLM's meaning: the last (first) 5 tokens of the whole tokenized input, specials included.
    np.testing.assert_allclose(vectors(left), vectors(embed(minilm, input=ids[-5:])), atol=1e-6)
    np.testing.assert_allclose(vectors(right), vectors(embed(minilm, input=ids[:5])), atol=1e-6)
    assert not np.allclose(vectors(left), vectors(right))
    # Token-id input is cut the same way.
    np.testing.assert_allclose(
        vectors(embed(minilm, input=ids, truncate_prompt_tokens=5, truncation_side="left")),
        vectors(left), atol=1e-6,
    )  # fmt: skip


def test_normalize_false_returns_the_pooled_vector(
    minilm: ServerProcess, sentence_transformer: Any
) -> None:
    normalized = vectors(embed(minilm, input=TEXTS))
    for flag in ({"normalize": False}, {"use_activation": False}):
        raw = vectors(embed(minilm, input=TEXTS, **flag))
        norms = np.linalg.norm(raw, axis=1)
        assert (np.abs(norms - 1) > 0.01).all()  # mean pooling is not unit length
        np.testing.assert_allclose(raw / norms[:, None], normalized, atol=1e-5)
    # sentence-transformers without its Normalize module gives the same vector.
    from sentence_transformers import SentenceTransformer

    transformer, pooling, _normalize = sentence_transformer
    pooled = SentenceTransformer(modules=[transformer, pooling], device="cpu").encode(TEXTS)
    np.testing.assert_allclose(vectors(embed(minilm, input=TEXTS, normalize=False)), pooled,
                               atol=1e-5)  # fmt: skip


def test_base64_byte_order_and_special_tokens(minilm: ServerProcess) -> None:
    floats = vectors(embed(minilm, input=TEXTS[0]))[0]
    for order, dtype in (("native", "<f4"), ("little", "<f4"), ("big", ">f4")):
        out = embed(minilm, input=TEXTS[0], encoding_format="base64", endianness=order)
        decoded = np.frombuffer(base64.b64decode(out["data"][0]["embedding"]), dtype=dtype)
        np.testing.assert_allclose(decoded, floats, atol=1e-7)
    bare = embed(minilm, input=TEXTS[0], add_special_tokens=False)
    assert (
        bare["usage"]["prompt_tokens"]
        == embed(minilm, input=TEXTS[0])["usage"]["prompt_tokens"] - 2
    )  # no [CLS], no [SEP]
    assert not np.allclose(vectors(bare)[0], floats, atol=1e-3)


def test_truncate_false_and_bad_options_are_400s_naming_the_field(minilm: ServerProcess) -> None:
    long_text = "word " * 400  # more than MiniLM's 256 tokens
    cases = [
        ({"input": long_text, "truncate": False}, "truncate"),
        ({"input": "x", "truncate_prompt_tokens": 100_000}, "truncate_prompt_tokens"),
        ({"input": "x", "truncation_side": "left"}, "truncation_side"),
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": "x", "normalize": True, "use_activation": False}, "normalize"),
        ({"input": "x", "embed_dtype": "float16"}, "embed_dtype"),
        ({"input": "x", "priority": 3}, "priority"),
        ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "messages"),
    ]
    with minilm.client() as c:
        for body, param in cases:
            r = c.post("/openai/v1/embeddings", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        # By default (KServe's rule) a long input is truncated, not refused.
        assert c.post("/openai/v1/embeddings", json={"input": long_text}).status_code == 200
        # The native size is always allowed.
        assert (
            c.post("/openai/v1/embeddings", json={"input": "x", "dimensions": 384}).status_code
            == 200
        )


# --- Matryoshka ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matryoshka_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny mean-pooling embedder, declaring Matryoshka sizes as vLLM reads them."""
    target = tmp_path_factory.mktemp("matryoshka") / "model"
    shutil.copytree(model_path("embedding_mean"), target)
    config = json.loads((target / "config.json").read_text())
    config["matryoshka_dimensions"] = [16, 32]
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_matryoshka_dimensions_cut_then_normalise(server_pool: Pool, matryoshka_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    server = server_pool("--model_dir", str(matryoshka_dir))
    for dims in (16, 32):
        out = vectors(embed(server, input=TEXTS, dimensions=dims))
        assert out.shape == (2, dims)
        reference = SentenceTransformer(str(matryoshka_dir), device="cpu", truncate_dim=dims)
        np.testing.assert_allclose(out, reference.encode(TEXTS, normalize_embeddings=True),
                                   atol=1e-5)  # fmt: skip
        assert np.linalg.norm(out, axis=1) == pytest.approx([1, 1], abs=1e-5)
    with server.client() as c:
        r = c.post("/openai/v1/embeddings", json={"input": "x", "dimensions": 20})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert "16, 32" in r.json()["error"]["message"]


# --- vLLM's own server as the reference ---------------------------------------------------


@pytest.fixture(scope="module")
def vllm_minilm(minilm_dir: Path) -> Iterator[ServerProcess]:
    from _support.vllm_reference import start_vllm_reference

    server = start_vllm_reference(minilm_dir, "--runner", "pooling")
    try:
        yield server
    finally:
        server.stop()


def test_embeddings_and_score_equal_vllms(
    minilm: ServerProcess, vllm_minilm: ServerProcess
) -> None:
    body = {"model": "model", "input": TEXTS, "truncate_prompt_tokens": 6}
    with vllm_minilm.client() as c:
        ref = c.post("/v1/embeddings", json=body)
        ref_score = c.post("/score", json={"model": "model", "text_1": TEXTS[0], "text_2": TEXTS})
        ref_bad = c.post("/v1/embeddings", json={"model": "model", "input": "x", "dimensions": 8})
    assert ref.status_code == 200, ref.text
    ours = embed(minilm, **body)
    np.testing.assert_allclose(vectors(ours), vectors(ref.json()), atol=1e-5)
    assert ours["usage"]["prompt_tokens"] == ref.json()["usage"]["prompt_tokens"]
    with minilm.client() as c:
        score = c.post("/score", json={"model": "model", "text_1": TEXTS[0], "text_2": TEXTS})
        bad = c.post(
            "/openai/v1/embeddings", json={"model": "model", "input": "x", "dimensions": 8}
        )
    assert score.status_code == 200, score.text
    assert [d["score"] for d in score.json()["data"]] == pytest.approx(
        [d["score"] for d in ref_score.json()["data"]], abs=1e-5
    )
    assert score.json()["usage"]["prompt_tokens"] == ref_score.json()["usage"]["prompt_tokens"]
    assert ref_bad.status_code == bad.status_code == 400
