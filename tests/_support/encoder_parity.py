"""The encoder models, requests and comparison shared by the backend parity tests: whatever
runs the forward pass (Triton, ONNX Runtime), lmserve's answers must equal its in-process
PyTorch answers."""

from __future__ import annotations

import json
from typing import Any

from _support.servers import ServerProcess
from _support.tiny_models import model_path

# served name (= Triton model name) -> (tiny model, task)
MODELS = {
    "sentiment": ("sentiment", "sequence_classification"),
    "ner": ("ner", "token_classification"),
    "masked_lm": ("masked_lm", "fill_mask"),
    "embedding": ("embedding_mean", "text_embedding"),
}
TENSORS = "input_ids,attention_mask"
# ONNX Runtime vs PyTorch logits differ by < 1e-4 (lmserve export enforces it); probabilities
# are rounded to 4 decimals, so one unit in the last place may flip.
ATOL = 2e-4

TEXTS = {
    "sentiment": ["I love this movie", "I hate this", "the film was fine " * 20],
    "ner": ["Alice lives in Paris and works at Google", "bob visited berlin", "hi"],
    "masked_lm": ["The capital of France is [MASK].", "the capital of japan is [MASK] ."],
    "embedding": ["hello world", "a much longer sentence about cats and dogs and birds", "x"],
}
LABEL_PARAMETERS = {
    "sentiment": {"output": "labels"},
    "ner": {"output": "labels", "aggregation_strategy": "simple"},
    "masked_lm": {"output": "labels", "top_k": 3},
    "embedding": None,
}


def serve_args(name: str) -> list[str]:
    return ["--model_dir", str(model_path(MODELS[name][0])), "--model_name", name]


def assert_close(got: Any, want: Any, path: str = "$") -> None:
    """Equal structure and strings/ints, floats within ATOL (also inside V2's JSON strings)."""
    if isinstance(want, str) and want[:1] in "[{" and isinstance(got, str):
        assert_close(json.loads(got), json.loads(want), path)
    elif isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and isinstance(want, int | float), (path, got, want)
        assert abs(got - want) <= ATOL, (path, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, got, want)
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    else:
        assert got == want, (path, got, want)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    with server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def requests_for(name: str) -> list[tuple[str, dict[str, Any]]]:
    texts = TEXTS[name]
    v2_input = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}
    out: list[tuple[str, dict[str, Any]]] = [
        (f"/v1/models/{name}:predict", {"instances": texts}),
        (f"/v2/models/{name}/infer", {"inputs": [v2_input]}),
    ]
    parameters = LABEL_PARAMETERS[name]
    if parameters:
        out.append((f"/v1/models/{name}:predict", {"instances": texts, "parameters": parameters}))
        out.append((f"/v2/models/{name}/infer", {"inputs": [v2_input], "parameters": parameters}))
    if name == "embedding":
        out.append(("/openai/v1/embeddings", {"model": name, "input": texts}))
    return out
