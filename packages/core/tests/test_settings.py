"""lmserve_core.settings: ServeSettings validation and the dtype rules of docs/behaviour.md §1."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmserve_core import Backend, ConfigurationError, ServeSettings, Task
from lmserve_core.settings import DTYPE_CHOICES, PredictorProtocol, canonical_dtype


def test_defaults() -> None:
    s = ServeSettings()
    assert s.model_name == "model"
    assert s.model_dir is None and s.model_id is None
    assert s.task is None
    assert s.backend is Backend.auto
    assert s.dtype == "auto"
    assert s.host == "127.0.0.1"
    assert (s.http_port, s.grpc_port) == (8080, 8081)
    assert s.enable_grpc is True  # as KServe's model server
    assert s.predictor_protocol is PredictorProtocol.v2
    assert s.max_request_body_bytes == 16 * 1024 * 1024
    assert s.return_probabilities is False
    assert s.disable_lower_case is False
    assert s.tensor_input_name_list == []


@pytest.mark.parametrize("dtype", DTYPE_CHOICES)
def test_every_documented_dtype_is_accepted(dtype: str) -> None:
    assert ServeSettings(dtype=dtype).dtype == dtype


def test_dtype_choices_are_the_documented_ones() -> None:
    assert set(DTYPE_CHOICES) == {"auto", "float16", "half", "bfloat16", "float32", "float"}


@pytest.mark.parametrize("dtype", ["int8", "fp16", "FLOAT16", "float64", "", "bf16"])
def test_unknown_dtype_is_a_validation_error(dtype: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServeSettings(dtype=dtype)
    assert info.value.errors()[0]["loc"] == ("dtype",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text-classification", Task.sequence_classification),
        ("ner", Task.token_classification),
        ("fill-mask", Task.fill_mask),
        ("feature-extraction", Task.text_embedding),
        ("text_generation", Task.text_generation),
        (Task.text2text_generation, Task.text2text_generation),
    ],
)
def test_task_accepts_aliases(value: str | Task, expected: Task) -> None:
    assert ServeSettings(task=value).task is expected


def test_unknown_task_raises_configuration_error_naming_the_flag() -> None:
    # Raised as is (not wrapped by pydantic) so that the CLI can show its message.
    with pytest.raises(ConfigurationError) as info:
        ServeSettings(task="question-answering")
    assert info.value.param == "task"


def test_extra_fields_are_forbidden() -> None:
    with pytest.raises(ValidationError) as info:
        ServeSettings(model_nme="typo")  # type: ignore[call-arg]
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_assignment_is_validated() -> None:
    s = ServeSettings()
    with pytest.raises(ValidationError):
        s.dtype = "int4"
    assert s.dtype == "auto"
    s.task = "sentiment-analysis"  # type: ignore[assignment]
    assert s.task is Task.sequence_classification


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_name": ""},
        {"max_length": 0},
        {"max_length": -5},
        {"http_port": 70000},
        {"grpc_port": -1},
        {"max_batch_size": 0},
        {"max_request_body_bytes": 0},
        {"torch_threads": 0},
        {"backend": "tensorrt"},
        {"predictor_protocol": "grpc"},
        {"log_level": "verbose"},
    ],
)
def test_out_of_range_values_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ServeSettings(**kwargs)  # type: ignore[arg-type]


def test_enum_fields_parse_strings() -> None:
    s = ServeSettings(backend="vllm", predictor_protocol="grpc-v2")  # type: ignore[arg-type]
    assert s.backend is Backend.vllm
    assert s.predictor_protocol is PredictorProtocol.grpc_v2


def test_log_level_is_lower_cased() -> None:
    assert ServeSettings(log_level="WARNING").log_level == "warning"


def test_tensor_input_name_list() -> None:
    s = ServeSettings(tensor_input_names=" input_ids, attention_mask,,token_type_ids ")
    assert s.tensor_input_name_list == ["input_ids", "attention_mask", "token_type_ids"]


def test_every_field_documents_itself_for_the_cli() -> None:
    for name, field in ServeSettings.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("cli") is False:
            continue  # engine_args: carried, not a flag
        assert field.description, name
        assert isinstance(extra, dict) and isinstance(extra.get("aliases"), list), name
    assert ServeSettings.model_fields["max_length"].json_schema_extra["aliases"] == [  # type: ignore[index]
        "max_model_len"
    ]


ENCODER_TASKS = [t for t in Task if not t.is_generative]
GENERATIVE_TASKS = [t for t in Task if t.is_generative]


@pytest.mark.parametrize("task", ENCODER_TASKS)
@pytest.mark.parametrize("on_gpu", [True, False])
def test_auto_dtype_for_encoders_is_float32(task: Task, on_gpu: bool) -> None:
    assert canonical_dtype("auto", on_gpu=on_gpu, task=task) == "float32"


@pytest.mark.parametrize("task", GENERATIVE_TASKS)
def test_auto_dtype_for_generation_depends_on_the_device(task: Task) -> None:
    assert canonical_dtype("auto", on_gpu=True, task=task) == "float16"
    assert canonical_dtype("auto", on_gpu=False, task=task) == "float32"


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("half", "float16"),
        ("float16", "float16"),
        ("float", "float32"),
        ("float32", "float32"),
        ("bfloat16", "bfloat16"),
    ],
)
@pytest.mark.parametrize("task", [Task.text_generation, Task.fill_mask])
@pytest.mark.parametrize("on_gpu", [True, False])
def test_explicit_dtype_wins_and_aliases_resolve(
    dtype: str, expected: str, task: Task, on_gpu: bool
) -> None:
    assert canonical_dtype(dtype, on_gpu=on_gpu, task=task) == expected
