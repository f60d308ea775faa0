"""Rerank on the backends other than the in-process Hugging Face one (that one: test_rerank_e2e.py).

The trained tiny cross-encoder (``_support/cross_encoder.py``, a BERT with token types) is served
on vLLM's pooling runner (``--backend vllm``), by ONNX Runtime in-process (``--backend onnx``),
and through the Triton bridge (``--predictor_host``: lmserve tokenizes, a real Triton server runs
the graph ``lmserve export --task rerank`` wrote). On the V1 ``:predict`` route, with
``[query, document]`` instances, each gives ``sentence_transformers.CrossEncoder.predict``'s
scores within 1e-5.

A pair longer than the model's 64 tokens is cut document first by lmserve, longest first by
CrossEncoder: its score is compared with the Hugging Face backend's (itself checked against a
plain transformers forward of the ``only_second`` truncation).

The embedding change rides along: vLLM now returns pooled vectors unnormalised and lmserve
normalises them, so its embeddings (normalised or not) must equal the Hugging Face backend's.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
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
from _support.sdk import openai_client
from _support.servers import ServerProcess, start_server
from _support.triton import TritonServer, start_triton, unavailable_reason

pytestmark = pytest.mark.slow

Pool = Callable[..., ServerProcess]
ROOT = Path(__file__).resolve().parents[1]
# As test_vllm_e2e.py (the same flags share its servers when both run in one session).
KV = str(512 * 2**20)
VLLM = ("--backend", "vllm", "--kv-cache-memory-bytes", KV)
# --backend onnx caches its export under the model files' key (as test_onnx_backend_e2e.py).
ONNX_CACHE = ROOT / ".cache" / "lmserve-test-cache"
TENSORS = "input_ids,attention_mask,token_type_ids"
TRITON_MODEL = "ce"
ATOL = 1e-5

PAIRS = [
    [query, passage]
    for query, (relevant, irrelevant) in RERANK_QUERIES.items()
    for passage in relevant + irrelevant
]
LONG = [LONG_PASSAGE_QUERY, LONG_PASSAGE]


@pytest.fixture(scope="module")
def ce_dir() -> Path:
    return cross_encoder_path()


@pytest.fixture(scope="module")
def expected(ce_dir: Path) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    scores = CrossEncoder(str(ce_dir), device="cpu").predict([tuple(p) for p in PAIRS])
    return np.asarray(scores, dtype=np.float64)


def predict(server: ServerProcess, instances: list[list[str]]) -> list[float]:
    with server.client() as client:
        r = client.post("/v1/models/model:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    predictions: list[float] = r.json()["predictions"]
    assert all(isinstance(p, float) for p in predictions), predictions
    return predictions


def document_first_score(ce_dir: Path) -> float:
    """The long pair truncated document first (``only_second``) to 64 tokens, through a plain
    transformers forward, sigmoid applied (CrossEncoder's activation for this model)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ce_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(ce_dir), dtype=torch.float32)
    inputs = tokenizer(*LONG, truncation="only_second", max_length=64, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == 64 < LONG_PAIR_TOKENS
    with torch.no_grad():
        return float(model.eval()(**inputs).logits[0, 0].sigmoid())


@pytest.fixture(scope="module")
def long_score(server_pool: Pool, ce_dir: Path) -> float:
    """The Hugging Face backend's score of the long pair, the reference for the others."""
    hf = server_pool("--model_dir", str(ce_dir), "--backend", "huggingface")
    (score,) = predict(hf, [LONG])
    assert score == pytest.approx(document_first_score(ce_dir), abs=ATOL)
    assert score > 0.5  # relevant: the document's head survives the cut
    return score


def assert_scores(server: ServerProcess, expected: np.ndarray, long_score: float) -> None:
    got = predict(server, [*PAIRS, LONG])
    np.testing.assert_allclose(got[:-1], expected, rtol=0, atol=ATOL)
    assert got[-1] == pytest.approx(long_score, abs=ATOL)
    # One pair at a time (other batch shapes, other padding) scores the same.
    for i in (0, len(PAIRS) - 1):
        assert predict(server, [PAIRS[i]])[0] == pytest.approx(expected[i], abs=ATOL)


def metadata(server: ServerProcess) -> dict[str, Any]:
    with server.client() as client:
        body: dict[str, Any] = client.get("/v2/models/model").json()
    return body


# --- vLLM ------------------------------------------------------------------------------------


def test_vllm_scores_equal_cross_encoder(
    server_pool: Pool, ce_dir: Path, expected: np.ndarray, long_score: float
) -> None:
    server = server_pool("--model_dir", str(ce_dir), *VLLM)  # the task inferred: rerank
    params = metadata(server)["parameters"]
    assert (params["backend"], params["task"], params["token_type_ids"]) == ("vllm", "rerank", True)
    assert_scores(server, expected, long_score)


def test_vllm_raw_logits_are_the_models(
    server_pool: Pool, ce_dir: Path, expected: np.ndarray
) -> None:
    """vLLM returns the raw logit; lmserve applies (or, asked, leaves out) the activation."""
    server = server_pool("--model_dir", str(ce_dir), *VLLM)
    query, documents = PAIRS[0][0], [p[1] for p in PAIRS if p[0] == PAIRS[0][0]]
    with server.client() as client:
        r = client.post("/score", json={"text_1": query, "text_2": documents,
                                        "use_activation": False})  # fmt: skip
    assert r.status_code == 200, r.text
    logits = [math.log(p / (1 - p)) for p in expected[: len(documents)]]
    np.testing.assert_allclose([d["score"] for d in r.json()["data"]], logits, atol=1e-4)


def test_vllm_embeddings_equal_huggingface(server_pool: Pool) -> None:
    """Pooled unnormalised by vLLM, normalised by lmserve: the Hugging Face backend's vectors,
    normalised or not."""
    sentences = ["This is an example sentence.", "Each sentence is converted", "hi"]
    vllm = server_pool("--model_id", "all-minilm-l6-v2", *VLLM)
    hf = server_pool("--model_id", "all-minilm-l6-v2", "--backend", "huggingface")
    unit = [np.asarray(_embed_v1(s, sentences)) for s in (vllm, hf)]
    np.testing.assert_allclose(unit[0], unit[1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(unit[0], axis=1), 1.0, atol=1e-6)
    raw = [
        np.asarray([d.embedding for d in openai_client(s, timeout=180).embeddings.create(
            model="model", input=sentences, extra_body={"use_activation": False}).data])
        for s in (vllm, hf)
    ]  # fmt: skip
    np.testing.assert_allclose(raw[0], raw[1], rtol=0, atol=ATOL)
    assert not np.allclose(np.linalg.norm(raw[0], axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0], axis=1, keepdims=True), unit[0],
                               atol=ATOL)  # fmt: skip


def _embed_v1(server: ServerProcess, sentences: list[str]) -> list[list[float]]:
    with server.client() as client:
        r = client.post("/v1/models/model:predict", json={"instances": sentences})
    assert r.status_code == 200, r.text
    vectors: list[list[float]] = r.json()["predictions"]
    return vectors


# --- lmserve export, ONNX Runtime in-process, Triton -------------------------------------------


def lmserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from lmserve_server.cli import main; main()", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(ce_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Triton model repository ``lmserve export --task rerank`` writes."""
    repo = tmp_path_factory.mktemp("rerank-repo")
    r = lmserve("export", "--model_dir", str(ce_dir), "--task", "rerank",
                "--tensor_input_names", TENSORS, "--output", str(repo),
                "--model_name", TRITON_MODEL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # The sequence-classification graph: one FP32 logit per pair.
    printed = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert "output logits FP32 [-1, 1] config.pbtxt dims [ 1 ]" in printed, r.stdout
    config = (repo / TRITON_MODEL / "config.pbtxt").read_text()
    assert 'name: "token_type_ids"' in config and "dims: [ 1 ]" in config
    return repo


def test_export_writes_the_cross_encoder_graph(
    exported: Path, ce_dir: Path, expected: np.ndarray
) -> None:
    """The graph itself, run by ONNX Runtime on the tokenizer's pairs: CrossEncoder's logits."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    session = ort.InferenceSession(str(exported / TRITON_MODEL / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    assert [i.name for i in session.get_inputs()] == TENSORS.split(",")
    tokenizer = AutoTokenizer.from_pretrained(str(ce_dir))
    batch = tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS], padding=True,
                      truncation=True, return_tensors="np")  # fmt: skip
    (logits,) = session.run(None, {n: batch[n].astype(np.int64) for n in TENSORS.split(",")})
    assert logits.shape == (len(PAIRS), 1) and logits.dtype == np.float32
    np.testing.assert_allclose(1 / (1 + np.exp(-logits[:, 0])), expected, rtol=0, atol=ATOL)


def test_onnx_backend_scores_equal_cross_encoder(
    ce_dir: Path, expected: np.ndarray, long_score: float
) -> None:
    # No --tensor_input_names: lmserve's own export takes token_type_ids (this model reads them).
    server = start_server(["--model_dir", str(ce_dir), "--backend", "onnx"],
                          env={"LMSERVE_CACHE_DIR": str(ONNX_CACHE)}, timeout=600)  # fmt: skip
    try:
        params = metadata(server)["parameters"]
        assert (params["backend"], params["task"]) == ("onnx", "rerank")
        assert Path(params["onnx"]).is_relative_to(ONNX_CACHE)
        assert_scores(server, expected, long_score)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def triton(exported: Path) -> Iterator[TritonServer]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = start_triton(exported)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", ["v2", "grpc-v2"])
def test_triton_bridge_scores_equal_cross_encoder(
    protocol: str, triton: TritonServer, ce_dir: Path, expected: np.ndarray, long_score: float
) -> None:
    host = triton.http_host if protocol == "v2" else triton.grpc_url
    server = start_server(["--model_dir", str(ce_dir), "--predictor_host", host,
                           "--predictor_protocol", protocol, "--tensor_input_names", TENSORS,
                           "--model_name", TRITON_MODEL])  # fmt: skip
    try:
        with server.client() as client:
            meta = client.get(f"/v2/models/{TRITON_MODEL}").json()
            assert meta["parameters"]["predictor_outputs"] == [
                {"name": "logits", "datatype": "FP32", "shape": [-1, 1]}
            ]
            r = client.post(f"/v1/models/{TRITON_MODEL}:predict",
                            json={"instances": [*PAIRS, LONG]})  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        np.testing.assert_allclose(got[:-1], expected, rtol=0, atol=ATOL)
        assert got[-1] == pytest.approx(long_score, abs=ATOL)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_a_graph_without_token_types_is_refused(ce_dir: Path, tmp_path: Path) -> None:
    """This cross-encoder reads token types: a graph without them would score every pair as
    one segment. Refused when exporting and when serving, naming the flag."""
    r = lmserve("export", "--model_dir", str(ce_dir), "--task", "rerank",
                "--tensor_input_names", "input_ids,attention_mask", "--output", str(tmp_path))  # fmt: skip
    assert r.returncode == 2 and "token_type_ids" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", "--model_dir", str(ce_dir), "--backend", "onnx",
         "--tensor_input_names", "input_ids,attention_mask", "--http_port", "0", "--grpc_port", "0"],
        capture_output=True, text=True, timeout=300,
        env={**_env(), "LMSERVE_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert r.returncode != 0 and "--tensor_input_names" in r.stderr, r.stderr
    assert "token_type_ids" in r.stderr and not (tmp_path / "cache" / "onnx").exists()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")} | {
        "HF_HUB_OFFLINE": "1"
    }


def test_predictor_metadata_without_token_types_is_refused(ce_dir: Path) -> None:
    """Transformer mode with --tensor_input_names leaving them out stops at startup, before
    any Triton is asked (the graph cannot score this model's pairs whatever it is)."""
    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", "--model_dir", str(ce_dir),
         "--predictor_host", "127.0.0.1:1", "--tensor_input_names", "input_ids,attention_mask",
         "--http_port", "0", "--grpc_port", "0"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert r.returncode != 0 and "token_type_ids" in r.stderr, r.stderr


def test_vllm_reranker_of_two_labels_is_refused_before_the_engine(tmp_path: Path) -> None:
    """A two-label classifier is no reranker: refused at once, not after a minute of engine."""
    from _support.tiny_models import model_path

    r = subprocess.run(
        [sys.executable, "-m", "lmserve_server", "--model_dir", str(model_path("sentiment")),
         "--task", "rerank", *VLLM, "--http_port", "0", "--grpc_port", "0"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert r.returncode != 0 and "2 output labels" in r.stderr, r.stderr
    assert "vLLM engine" not in r.stderr
