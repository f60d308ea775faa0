"""The vLLM pooling backend without an engine: what it asks vLLM for, how a reranker's token
types travel, and the model facts post-processing reads (the engine itself: tests/)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from lmserve_backend_vllm.loader import (
    POOLING_TASKS,
    check_reranker,
    check_supported,
    pooling_model_info,
    pooling_options,
    reads_token_types,
)
from lmserve_backend_vllm.pooling import (
    PoolingTaskName,
    VLLMPoolingEncoder,
    first_type_one,
    request_rows,
)
from lmserve_core.backend import LoadRequest
from lmserve_core.errors import BackendError, ConfigurationError
from lmserve_core.model_files import ModelSource
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task


def test_first_type_one_is_vllms_compression() -> None:
    assert first_type_one([0, 0, 0, 1, 1]) == 3
    assert first_type_one([1, 1]) == 0
    assert first_type_one([0, 0, 0]) is None
    assert first_type_one([]) is None
    for bad in ([0, 1, 0], [0, 2], [1, 0]):
        with pytest.raises(BackendError, match="zeros followed by ones"):
            first_type_one(bad)


def test_rows_drop_padding_and_carry_the_first_document_position() -> None:
    inputs = {
        "input_ids": np.array([[2, 7, 3, 9, 3], [2, 8, 3, 4, 0]]),
        "attention_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        # Padding's type is 0 (pad_encodings): it must not read as a "1 then 0" row.
        "token_type_ids": np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]),
    }
    assert request_rows(inputs, token_types=True) == [([2, 7, 3, 9, 3], 3), ([2, 8, 3, 4], 3)]
    assert request_rows(inputs, token_types=False) == [
        ([2, 7, 3, 9, 3], None),
        ([2, 8, 3, 4], None),
    ]
    del inputs["token_type_ids"]
    assert request_rows(inputs, token_types=True) == [([2, 7, 3, 9, 3], None), ([2, 8, 3, 4], None)]


class _Engine:
    """Records what ``AsyncLLM.encode`` was asked; answers the row's length as the output."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any]] = []

    async def encode(
        self, prompt: dict[str, Any], params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        self.calls.append((prompt, params))
        import torch

        data = torch.tensor([float(len(prompt["prompt_token_ids"]))])
        yield SimpleNamespace(outputs=SimpleNamespace(data=data))

    def shutdown(self) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_vllm_is_asked_for_the_raw_pooler_output(
    task: PoolingTaskName, loop: asyncio.AbstractEventLoop
) -> None:
    """No normalisation (embed) or activation (classify, rerank): lmserve applies them."""
    engine = _Engine()
    encoder = VLLMPoolingEncoder(engine, loop, task=task, token_types=task == "classify")
    out = encoder.forward({
        "input_ids": np.array([[2, 7, 3, 9, 3], [2, 8, 3, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "token_type_ids": np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]),
    })  # fmt: skip
    assert out.tolist() == [[5.0], [3.0]]
    prompts = [prompt["prompt_token_ids"] for prompt, _ in engine.calls]
    assert prompts == [[2, 7, 3, 9, 3], [2, 8, 3]]
    for _, params in engine.calls:
        assert params.task == task and params.use_activation is False
        assert params.dimensions is None  # Matryoshka cuts are lmserve's (before normalising)
    extras = [params.extra_kwargs for _, params in engine.calls]
    if task == "classify":
        assert extras == [{"compressed_token_type_ids": 3}, None]
    else:
        assert extras == [None, None]


def test_rerank_is_served_on_the_pooling_runner() -> None:
    assert POOLING_TASKS[Task.rerank] == "classify"
    check_supported(Task.rerank, {"architectures": ["BertForSequenceClassification"]})
    check_supported(Task.text_embedding, {"architectures": ["BertModel"]})


def test_a_reranker_has_one_label() -> None:
    check_reranker({"id2label": {"0": "LABEL_0"}}, "m")
    check_reranker({"num_labels": 1}, "m")
    check_reranker({}, "m")
    with pytest.raises(ConfigurationError, match="2 output labels") as info:
        check_reranker({"id2label": {"0": "NEGATIVE", "1": "POSITIVE"}}, "m")
    assert info.value.param == "task"


def test_token_types_follow_the_tokenizer_and_the_model() -> None:
    bert = SimpleNamespace(model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    roberta = SimpleNamespace(model_input_names=["input_ids", "attention_mask"])
    assert reads_token_types({"type_vocab_size": 2}, bert)
    assert not reads_token_types({"type_vocab_size": 1}, bert)
    assert not reads_token_types({}, bert)
    assert not reads_token_types({"type_vocab_size": 2}, roberta)


def _request(tmp_path: Path, config: dict[str, Any], **files: dict[str, Any]) -> LoadRequest:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    settings = ServeSettings(model_dir=str(tmp_path))
    return LoadRequest(settings, ModelSource(tmp_path, str(tmp_path)), Task.rerank, config)


def test_model_info_reads_the_cross_encoder_activation_and_matryoshka_sizes(tmp_path: Path) -> None:
    config = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0"},
              "hidden_size": 64, "vocab_size": 100, "matryoshka_dimensions": [16, 32]}  # fmt: skip
    st = {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity"}
    info = pooling_model_info(_request(tmp_path, config, config_sentence_transformers=st), 64)
    assert info.score_activation == "identity"
    assert info.matryoshka_dimensions == (16, 32)
    assert (info.max_length, info.hidden_size, info.id2label) == (64, 64, {0: "LABEL_0"})


def test_model_info_defaults_to_sigmoid(tmp_path: Path) -> None:
    info = pooling_model_info(_request(tmp_path, {"num_labels": 1}), 128)
    assert info.score_activation == "sigmoid" and info.matryoshka_dimensions is None


def test_options_carry_token_types_only_when_asked() -> None:
    settings = ServeSettings()
    assert pooling_options(settings, token_type_ids=True).return_token_type_ids
    assert not pooling_options(settings, token_type_ids=False).return_token_type_ids
