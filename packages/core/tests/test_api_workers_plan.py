"""--api_workers N > 1 is checked before any port opens: only where a worker can do everything
but the forward pass (encoder tasks on the in-process backends)."""

from __future__ import annotations

import pytest

from lmserve_core.errors import ConfigurationError
from lmserve_core.plan import check_api_workers
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task


@pytest.mark.parametrize("backend", ["huggingface", "onnx"])
@pytest.mark.parametrize("task", [Task.sequence_classification, Task.text_embedding, Task.rerank])
def test_encoders_on_in_process_backends_pass(backend: str, task: Task) -> None:
    check_api_workers(ServeSettings(api_workers=4), backend, task)


@pytest.mark.parametrize(
    "fields, backend, task, why",
    [
        ({}, "huggingface", Task.text_generation, "text_generation is generative"),
        ({}, "vllm", Task.text_generation, "generative"),
        ({}, "huggingface", Task.text2text_generation, "generative"),
        ({}, "vllm", Task.text_embedding, "the vllm backend is not supported"),
        ({"predictor_host": "triton:8000"}, "triton", Task.fill_mask, "--predictor_host"),
        ({"enable_lora": True}, "huggingface", Task.sequence_classification, "--enable_lora"),
    ],
)
def test_everything_else_is_refused_naming_the_flag(
    fields: dict[str, object], backend: str, task: Task, why: str
) -> None:
    with pytest.raises(ConfigurationError, match=why) as info:
        check_api_workers(ServeSettings(api_workers=2, **fields), backend, task)  # type: ignore[arg-type]
    assert info.value.param == "api_workers"
    assert info.value.message.startswith("--api_workers 2: ")


def test_one_worker_is_never_refused() -> None:
    check_api_workers(ServeSettings(enable_lora=True), "vllm", Task.text_generation)


def test_zero_workers_is_not_a_setting() -> None:
    with pytest.raises(ValueError, match="api_workers"):
        ServeSettings(api_workers=0)
