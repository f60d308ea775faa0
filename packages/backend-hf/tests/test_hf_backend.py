"""The Hugging Face backend on real (tiny, trained) models and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from _support.tiny_models import model_path
from lmserve_backend_hf import create_backend
from lmserve_backend_hf.tokenizer import load_tokenizer
from lmserve_core.backend import LoadRequest
from lmserve_core.builtin_models import locate_builtin
from lmserve_core.encoder import EncoderService
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import ModelSource, read_model_config
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

pytestmark = pytest.mark.slow


def load(path: Path, task: Task, **settings: object):
    request = LoadRequest(ServeSettings(torch_threads=1, **settings), ModelSource(path, str(path)), task,
                          read_model_config(path))  # fmt: skip
    return create_backend(request)


def test_tokenizer_offsets_word_ids_and_special_mask() -> None:
    tok = load_tokenizer(
        str(model_path("ner")), revision=None, trust_remote_code=False, disable_lower_case=False
    )
    (enc,) = tok.encode_batch(["Alice lives"], add_special_tokens=True, max_length=None)
    assert enc.special_tokens_mask[0] == 1 and enc.special_tokens_mask[-1] == 1
    assert enc.word_ids[0] is None and enc.word_ids[1] == 0
    assert enc.offsets[1] == (0, 5)
    (bare,) = tok.encode_batch(["Alice lives"], add_special_tokens=False, max_length=None)
    assert len(bare) == len(enc) - 2
    (cut,) = tok.encode_batch(
        ["Alice lives in Paris and works"], add_special_tokens=True, max_length=4
    )
    assert len(cut) == 4 and cut.special_tokens_mask[-1] == 1  # still ends with [SEP]


@pytest.mark.parametrize(
    "path_fn", [lambda: model_path("masked_lm"), lambda: locate_builtin("all-minilm-l6-v2")]
)
def test_disable_lower_case_stops_lowercasing(path_fn) -> None:
    path = str(path_fn())
    default = load_tokenizer(path, revision=None, trust_remote_code=False, disable_lower_case=False)
    cased = load_tokenizer(path, revision=None, trust_remote_code=False, disable_lower_case=True)
    lower = default.encode_batch(["Paris"], add_special_tokens=False, max_length=None)[0].ids
    assert (
        default.encode_batch(["paris"], add_special_tokens=False, max_length=None)[0].ids == lower
    )
    # Uncased vocabularies have no "Paris": the cased tokenizer must produce other ids.
    assert cased.encode_batch(["Paris"], add_special_tokens=False, max_length=None)[0].ids != lower
    assert cased.encode_batch(["paris"], add_special_tokens=False, max_length=None)[0].ids == lower


def test_loader_facts_and_service_answers() -> None:
    loaded = load(model_path("sentiment"), Task.sequence_classification)
    assert loaded.info.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert loaded.info.max_length == 64
    assert loaded.details["dtype"] == "float32"

    async def run() -> list[object]:
        service = EncoderService(task=Task.sequence_classification, tokenizer=loaded.tokenizer,
                                 backend=loaded.backend, info=loaded.info, options=loaded.options)  # fmt: skip
        await service.start()
        try:
            results = await asyncio.gather(
                *(service.infer([t], None) for t in ["I love this", "I hate this"] * 4)
            )
        finally:
            await service.stop()
        return [r.predictions[0] for r in results]

    assert asyncio.run(run()) == [1, 0] * 4


def test_forward_matches_transformers_with_and_without_token_type_ids() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = model_path("sentiment")
    ref_model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(["I love this", "a much longer sentence here"],
                                                padding=True, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        expected = ref_model(**batch).logits.numpy()
    for flag in (False, True):
        loaded = load(path, Task.sequence_classification, return_token_type_ids=flag)
        inputs = {k: v.numpy() for k, v in batch.items() if flag or k != "token_type_ids"}
        np.testing.assert_allclose(loaded.backend.forward(inputs), expected, atol=1e-5)


def test_max_length_rules() -> None:
    assert load(model_path("ner"), Task.token_classification, max_length=16).info.max_length == 16
    with pytest.raises(ConfigurationError) as exc:
        load(model_path("ner"), Task.token_classification, max_length=4096)
    assert exc.value.param == "max_length"
    # all-MiniLM's sentence-transformers config caps it at 256 (BERT itself allows 512).
    assert load(locate_builtin("all-minilm-l6-v2"), Task.text_embedding).info.max_length == 256


def test_wrong_task_for_weights_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError) as exc:
        load(model_path("sentiment"), Task.fill_mask)
    assert exc.value.param in {"task", "model_dir"}


def test_dtype_flag_is_applied() -> None:
    loaded = load(model_path("sentiment"), Task.sequence_classification, dtype="bfloat16")
    assert loaded.details["dtype"] == "bfloat16"
    assert next(loaded.backend.model.parameters()).dtype.__str__() == "torch.bfloat16"
    out = loaded.backend.forward(
        {"input_ids": np.array([[2, 5, 3]]), "attention_mask": np.ones((1, 3), dtype=np.int64)}
    )
    assert out.dtype == np.float32


def test_generation_engine_faults_fail_requests_not_the_server() -> None:
    """A failing decode step fails its sequences and the engine carries on; a crash of the
    engine loop itself fails everything in flight, and health reports it from then on."""
    from lmserve_core.errors import BackendError
    from lmserve_core.generation.params import GenerationRequest, SamplingParams

    engine = load(model_path("llama"), Task.text_generation).backend
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def run(request_id: str) -> list[object]:
        return [e async for e in engine.generate(GenerationRequest(request_id, [5, 6, 7], params))]

    async def scenario() -> None:
        await engine.start()
        real_decode, calls = engine._decode, {"n": 0}

        def flaky_decode() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("CUDA error: device-side assert triggered")
            real_decode()

        engine._decode = flaky_decode
        with pytest.raises(BackendError, match="decoding failed: CUDA error"):
            await run("a")
        engine.check_health()  # one failed step is not a dead engine
        events = await run("b")
        assert events[-1].finish_reason == "length" and len(events) == 6

        def broken() -> None:
            raise RuntimeError("engine bug")

        engine._drop_finished = broken
        with pytest.raises(BackendError, match="generation engine crashed: engine bug"):
            await run("c")
        with pytest.raises(BackendError, match="engine bug"):
            engine.check_health()
        with pytest.raises(BackendError):
            await run("d")
        await engine.stop()

    asyncio.run(scenario())


def test_waiting_sequences_start_in_priority_then_arrival_order() -> None:
    from lmserve_backend_hf.engine import _Sequence, _WaitingQueue
    from lmserve_backend_hf.sampler import RowState
    from lmserve_core.generation.params import GenerationRequest, SamplingParams

    def seq(name: str, priority: int) -> _Sequence:
        request = GenerationRequest(name, [1], SamplingParams(max_tokens=1), priority)
        return _Sequence(request, lambda _: None, RowState(request.params, [1]), frozenset())

    waiting = _WaitingQueue()
    for name, priority in [("a", 0), ("b", 5), ("c", -1), ("d", 0), ("e", -1)]:
        waiting.put(seq(name, priority))
    waiting.put(None)  # a stop wake-up goes first
    assert waiting.get() is None
    order: list[str] = []
    while waiting.qsize():
        item = waiting.get()
        assert item is not None
        order.append(item.id)
    assert order == ["c", "e", "a", "d", "b"]


@pytest.mark.parametrize(
    "settings",
    [
        {"repetition_penalty": 5e-324},
        {"temperature": 1e-300},
        {"temperature": 1e-300, "top_p": 0.5},
    ],
)
def test_extreme_sampling_settings_still_draw_a_token(settings: dict[str, float]) -> None:
    import torch

    from lmserve_backend_hf.sampler import RowState, sample
    from lmserve_core.generation.params import SamplingParams

    params = SamplingParams(max_tokens=1, **{"temperature": 1.0, **settings})
    state = RowState(params, [0, 1, 2], generator=torch.Generator().manual_seed(0))
    logits = torch.tensor([[3.0, -2.0, 5.0, 0.5]])
    ((token, _),) = sample(logits, [state])
    assert 0 <= token < 4
