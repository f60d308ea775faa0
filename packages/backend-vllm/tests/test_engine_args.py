"""vLLM's own argument definitions on lmserve serve, and who owns the shared flags."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lmserve_backend_vllm.engine_args import (
    OWNED_BY_LMSERVE,
    build_engine_args,
    check,
    default_cpu_kv_cache_gib,
)
from lmserve_backend_vllm.generator import _logprob
from lmserve_backend_vllm.loader import UnsupportedByVLLM, check_supported
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task


@pytest.fixture(autouse=True)
def _undo_engine_env() -> Iterator[None]:
    """build_engine_args sets vLLM's CPU variables for the process it runs in; here that is
    pytest's, whose later server processes would inherit them: put back after each test."""
    names = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_vllm_flags_parse_with_vllms_parser() -> None:
    argv = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "1", "--distributed-executor-backend", "mp",
            "--enforce-eager", "--kv-cache-memory-bytes", "1000", "--max_num_batched_tokens", "512"]  # fmt: skip
    assert check(argv) == []
    assert check(["--enforce-eager", "--no_such_flag", "1"]) == ["--no_such_flag", "1"]


def test_a_bad_value_for_a_known_engine_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        check(["--tensor-parallel-size", "x"])
    assert exc.value.code == 2


@pytest.mark.parametrize("flag", sorted(OWNED_BY_LMSERVE))
def test_flags_owned_by_lmserve_are_refused_with_a_pointer(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        check([flag, "x"] if not flag.startswith("--no-") else [flag])
    assert exc.value.code == 2
    assert OWNED_BY_LMSERVE[flag] in capsys.readouterr().err


def _isolate_kv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_engine_args may set VLLM_CPU_KVCACHE_SPACE in os.environ; setenv first makes
    # monkeypatch restore the variable's absence afterwards, so it never leaks into the
    # servers later tests start (vLLM CPU lets that variable override --kv-cache-memory-bytes).
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")


def test_served_names_reach_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_kv_env(monkeypatch)
    settings = ServeSettings(served_model_name=["a", "b"])
    args = build_engine_args(settings, "/models/x", on_cpu=True, runner=None)
    assert args.served_model_name == ["a", "b"]


def test_lmserve_owns_the_shared_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_kv_env(monkeypatch)
    settings = ServeSettings(
        model_name="m", dtype="half", max_length=128, trust_remote_code=True, max_num_seqs=7,
        engine_args=("--tensor-parallel-size", "2", "--seed", "3"),
    )  # fmt: skip
    args = build_engine_args(settings, "/models/x", on_cpu=True, runner=None)
    assert (args.model, args.tokenizer, args.served_model_name) == ("/models/x", "/models/x", ["m"])
    assert (args.dtype, args.max_model_len, args.trust_remote_code, args.max_num_seqs) == (
        "float16",
        128,
        True,
        7,
    )
    assert args.tensor_parallel_size == 2 and args.seed == 3
    assert args.enforce_eager is True  # CPU default: no minute-long torch.compile
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == str(default_cpu_kv_cache_gib())
    assert 1 <= default_cpu_kv_cache_gib() <= 4


def test_lmserve_owns_the_lora_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """--enable-lora and its limits are lmserve's (they mean the same on the Hugging Face
    backend) and reach vLLM's engine as vLLM's own flags would."""
    _isolate_kv_env(monkeypatch)
    settings = ServeSettings(enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=6)
    args = build_engine_args(settings, "/models/x", on_cpu=True, runner=None)
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        True, 4, 8, 6,
    )  # fmt: skip
    assert build_engine_args(ServeSettings(), "/m", on_cpu=True, runner=None).enable_lora is False


def test_explicit_engine_choices_win_over_cpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_kv_env(monkeypatch)
    settings = ServeSettings(engine_args=("--no-enforce-eager", "--kv-cache-memory-bytes", "4096"))
    args = build_engine_args(settings, "/m", on_cpu=True, runner="pooling")
    assert (
        args.enforce_eager is False
        and args.kv_cache_memory_bytes == 4096
        and args.runner == "pooling"
    )
    assert "VLLM_CPU_KVCACHE_SPACE" not in __import__("os").environ
    assert build_engine_args(ServeSettings(), "/m", on_cpu=True, runner=None).dtype == "float32"


def test_what_vllm_cannot_serve_is_refused() -> None:
    with pytest.raises(UnsupportedByVLLM, match="encoder-decoder"):
        check_supported(
            Task.text2text_generation, {"architectures": ["T5ForConditionalGeneration"]}
        )
    with pytest.raises(UnsupportedByVLLM, match="fill_mask"):
        check_supported(Task.fill_mask, {"architectures": ["BertForMaskedLM"]})
    with pytest.raises(UnsupportedByVLLM, match="NoSuchModel"):
        check_supported(Task.text_generation, {"architectures": ["NoSuchModelForCausalLM"]})
    check_supported(Task.text_generation, {"architectures": ["LlamaForCausalLM"]})


class _LP:
    def __init__(self, logprob: float, rank: int) -> None:
        self.logprob, self.rank = logprob, rank


def test_logprob_mapping_keeps_rank_order_and_the_chosen_token() -> None:
    entry = {5: _LP(-0.1, 1), 9: _LP(-2.0, 2), 7: _LP(-3.0, 3), 42: _LP(-9.0, 17)}
    lp = _logprob(entry, 42, 2)
    assert lp is not None and lp.token_id == 42 and lp.logprob == -9.0
    assert lp.top == ((5, -0.1), (9, -2.0))
    assert _logprob(None, 1, 2) is None


def test_kv_env_does_not_leak_between_tests() -> None:
    import os

    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
