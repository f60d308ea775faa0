"""EncoderService: tokenization options, truncation, merged batches, input checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest

from lmserve_core import BackendError, InputTooLong, InvalidInput, ModelNotReady, Task
from lmserve_core.encoder import (
    EncoderOptions,
    EncoderResult,
    ModelInfo,
    RequestParams,
)
from lmserve_core.encoder.base import EncodedRequest
from lmserve_core.encoder.service import check_texts, length_bucket, pad_encodings
from lmserve_core.tokenizer import Encoding

PAD, CLS, SEP = 0, 2, 3
WAIT_S = 10.0  # bound on waits for the model thread; never asserted on


def position_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token logits whose argmax is the token id (3 classes: id % 3), padding class 2."""
    labels = np.where(mask == 1, ids % 3, 2)
    return 4.0 * np.eye(3)[labels]


def padding_poisoned_states(seed: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Hidden states [B, T, 6]: a fixed random vector per token id, 1e4 at padding positions
    (a pooling that read padding would show it)."""
    table = np.random.default_rng(seed).standard_normal((20, 6)).astype(np.float32)

    def hidden(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        h = table[ids].copy()
        h[mask == 0] = 1e4
        return h

    return hidden


def first_word_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.stack([ids[:, 1] % 2 == 0, ids[:, 1] % 2 == 1], axis=1).astype(np.float32)


def test_truncates_to_the_model_max_length_by_default(
    make_service: Callable[..., Any], infer: Callable[..., Any], tokenizer: Any
) -> None:
    service, backend = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=5))  # fmt: skip
    result = infer(service, ["the cat sat on the mat", "a dog"])
    assert tokenizer.calls[-1]["max_length"] == 5
    assert backend.calls[0]["input_ids"].tolist() == [[CLS, 5, 6, 7, SEP], [CLS, 17, 18, SEP, PAD]]
    assert result.outputs[0].shape == [2, 1, 5]
    assert result.token_count == 5 + 4


def test_truncate_false_refuses_too_long_input(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=5))  # fmt: skip
    with pytest.raises(InputTooLong) as info:
        infer(service, ["a dog", "the cat sat on the mat"], {"truncate": False})
    assert isinstance(info.value, InvalidInput)
    assert info.value.param == "truncate"
    assert "instance 1" in info.value.message and "8 tokens" in info.value.message
    assert backend.calls == []


def test_truncate_false_accepts_input_that_fits(
    make_service: Callable[..., Any], infer: Callable[..., Any], tokenizer: Any
) -> None:
    service, _ = make_service(Task.token_classification, position_logits,
                              info=ModelInfo(max_length=5))  # fmt: skip
    result = infer(service, ["the cat sat"], {"truncate": False})
    assert tokenizer.calls[-1]["max_length"] is None
    assert result.outputs[0].shape == [1, 1, 5]


def test_truncate_must_be_a_boolean(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.token_classification, position_logits)
    with pytest.raises(InvalidInput) as info:
        infer(service, ["a"], {"truncate": "no"})
    assert info.value.param == "truncate"


def test_backend_inputs_are_right_padded_int64(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.sequence_classification, first_word_logits)
    infer(service, ["a", "the cat sat"])
    (call,) = backend.calls
    assert set(call) == {"input_ids", "attention_mask"}
    assert call["input_ids"].dtype == np.int64 and call["attention_mask"].dtype == np.int64
    assert call["input_ids"].tolist() == [[CLS, 17, SEP, PAD, PAD], [CLS, 5, 6, 7, SEP]]
    assert call["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_token_type_ids_only_when_asked(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    options = EncoderOptions(return_token_type_ids=True)
    service, backend = make_service(
        Task.sequence_classification, first_word_logits, options=options
    )
    infer(service, ["a", "the cat"])
    assert backend.calls[0]["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_disable_special_tokens(
    make_service: Callable[..., Any], infer: Callable[..., Any], tokenizer: Any
) -> None:
    options = EncoderOptions(add_special_tokens=False)
    service, backend = make_service(Task.token_classification, position_logits, options=options)
    result = infer(service, ["the cat"])
    assert tokenizer.calls[-1]["add_special_tokens"] is False
    assert backend.calls[0]["input_ids"].tolist() == [[5, 6]]
    assert result.predictions == [[[5 % 3, 6 % 3]]]


def test_text_with_no_tokens_is_invalid(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    options = EncoderOptions(add_special_tokens=False)
    service, backend = make_service(Task.token_classification, position_logits, options=options)
    with pytest.raises(InvalidInput) as info:
        infer(service, ["the", "   "])
    assert info.value.param == "instances"
    assert backend.calls == []


@pytest.mark.parametrize(
    "texts", [[], (), "a string", None, {"a": 1}, [1], ["ok", None], ["ok", b"bytes"]]
)
def test_check_texts_errors(texts: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        check_texts(texts)
    assert info.value.param == "instances"


def test_check_texts_accepts_lists_and_tuples() -> None:
    assert check_texts(("a", "")) == ["a", ""]
    assert check_texts(["x"]) == ["x"]


def test_infer_rejects_bad_texts(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, backend = make_service(Task.sequence_classification, first_word_logits)
    with pytest.raises(InvalidInput, match="instance 1 is int"):
        infer(service, ["a", 3])
    assert backend.calls == []


def test_backend_with_wrong_row_count_is_a_backend_error(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    service, _ = make_service(Task.sequence_classification, lambda ids, mask: np.zeros((1, 2)))
    with pytest.raises(BackendError, match="1 rows for 2 inputs"):
        infer(service, ["a", "the"])


def test_backend_crash_is_a_backend_error(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    def crash(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    service, _ = make_service(Task.sequence_classification, crash)
    with pytest.raises(BackendError, match="device lost"):
        infer(service, ["a"])


def test_model_thread_is_not_the_event_loop_thread(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    import threading

    service, backend = make_service(Task.sequence_classification, first_word_logits)
    infer(service, ["a"])
    assert backend.threads and backend.threads[0] != threading.get_ident()


def test_stop_closes_the_backend_and_refuses_requests(make_service: Callable[..., Any]) -> None:
    service, backend = make_service(Task.sequence_classification, first_word_logits)

    async def main() -> None:
        await service.start()
        await service.stop()
        with pytest.raises(ModelNotReady):
            await service.infer(["a"], None)

    asyncio.run(main())
    assert backend.closed


def test_generative_tasks_are_not_encoder_tasks(make_service: Callable[..., Any]) -> None:
    for task in (Task.text_generation, Task.text2text_generation):
        with pytest.raises(ValueError):
            make_service(task, first_word_logits)


def test_pad_encodings() -> None:
    a = Encoding([2, 7, 3], [0, 1, 1], [(0, 0)] * 3, [1, 0, 1], [None, 0, None])
    b = Encoding([2, 3], [], [(0, 0)] * 2, [1, 1], [None, None])
    out = pad_encodings([a, b], pad_id=9, length=4, with_token_types=True)
    assert out["input_ids"].tolist() == [[2, 7, 3, 9], [2, 3, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert "token_type_ids" not in pad_encodings([a], pad_id=0, length=3, with_token_types=False)


# --- merged batches -----------------------------------------------------------------


def test_run_batch_trims_each_request_to_its_own_length(
    make_service: Callable[..., Any], tokenizer: Any
) -> None:
    service, backend = make_service(Task.token_classification, position_logits)
    short = service.encode(["a"], RequestParams())  # 3 tokens
    long = service.encode(["the cat sat on", "dog"], RequestParams())  # 6 and 3 tokens
    out_short, out_long = service._run_batch([short, long])
    assert backend.calls[0]["input_ids"].shape == (3, 6)  # one padded forward pass
    assert out_short.shape == (1, 3, 3)
    assert out_long.shape == (2, 6, 3)
    # Rows stay with their request: the short one's tokens are [CLS] a [SEP].
    assert out_short[0].argmax(-1).tolist() == [CLS % 3, 17 % 3, SEP % 3]


def _queued_together(
    service: Any, backend: Any, requests: list[tuple[list[Any], Any]], blocker: Any = ("john",)
) -> list[EncoderResult | BaseException]:
    """Block the first forward pass (``blocker``'s instances), queue ``requests`` (instances,
    and V1 parameters or ``RequestParams``), release: they share the next batch. Each answer
    in order (after the blocker's), or its exception."""

    def infer(texts: list[str], params: Any) -> Any:
        if isinstance(params, RequestParams):
            return service.infer_texts(texts, params)
        return service.infer(texts, params)

    async def main() -> list[EncoderResult | BaseException]:
        await service.start()
        try:
            blocked = asyncio.ensure_future(service.infer(list(blocker), None))
            assert await asyncio.to_thread(backend.started.wait, WAIT_S)
            queued = [asyncio.ensure_future(infer(t, p)) for t, p in requests]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while service.batcher.queued < len(requests):
                assert loop.time() < deadline, "the requests never reached the queue"
                await asyncio.sleep(0.001)
            backend.release.set()
            return list(await asyncio.gather(blocked, *queued, return_exceptions=True))
        finally:
            backend.release.set()
            await service.stop()

    return asyncio.run(main())


def _merged(
    make_service: Callable[..., Any], task: Task, fn: Any, **kw: Any
) -> tuple[list[EncoderResult], Any]:
    """Two requests of different lengths queued behind a blocked pass, so they merge."""
    service, backend = make_service(task, fn, block_first=True, **kw)
    long_texts = ["the cat sat on the mat .", "a"]  # 9 and 3 tokens -> L = 9
    short_texts = ["a dog", "new york", "paris"]  # 4, 4, 3 tokens -> L = 4
    answers = _queued_together(service, backend, [(long_texts, None), (short_texts, None)])
    assert all(isinstance(a, EncoderResult) for a in answers), answers
    return cast(list[EncoderResult], answers), backend


def test_concurrent_requests_are_merged_and_trimmed(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    (blocker, long_res, short_res), backend = _merged(
        make_service, Task.token_classification, position_logits
    )
    assert len(backend.calls) == 2
    assert backend.calls[1]["input_ids"].shape == (5, 9)  # both requests in one pass
    assert blocker.outputs[0].shape == [1, 1, 3]
    assert long_res.outputs[0].shape == [2, 1, 9]
    assert short_res.outputs[0].shape == [3, 1, 4]
    assert [len(p[0]) for p in short_res.predictions] == [4, 4, 4]
    # The same as serving each request alone.
    for texts, merged in (
        (["the cat sat on the mat .", "a"], long_res),
        (["a dog", "new york", "paris"], short_res),
    ):
        service, _ = make_service(Task.token_classification, position_logits)
        alone = infer(service, texts)
        assert merged.predictions == alone.predictions
        np.testing.assert_array_equal(merged.outputs[0].data, alone.outputs[0].data)
    assert short_res.token_count == 11 and long_res.token_count == 12


def test_a_merged_batch_is_tokenized_in_one_call(
    make_service: Callable[..., Any], tokenizer: Any
) -> None:
    """The batch's requests are tokenized together on the model thread, not one call each."""
    _merged(make_service, Task.token_classification, position_logits)
    texts = [call["texts"] for call in tokenizer.calls]
    assert texts == [["john"], ["the cat sat on the mat .", "a", "a dog", "new york", "paris"]]


def test_requests_with_other_settings_are_tokenized_apart_in_the_same_pass(
    make_service: Callable[..., Any], tokenizer: Any
) -> None:
    service, backend = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=5), block_first=True)  # fmt: skip
    answers = _queued_together(service, backend, [
        (["the cat sat on the mat"], None),
        (["new york"], {"truncate": False}),
        (["paris"], None),
    ])  # fmt: skip
    assert [(c["texts"], c["max_length"]) for c in tokenizer.calls[1:]] == [
        (["the cat sat on the mat", "paris"], 5), (["new york"], None)
    ]  # fmt: skip
    assert backend.calls[1]["input_ids"].shape == (3, 5)  # still one forward pass
    assert [a.token_count for a in answers[1:]] == [5, 4, 3]  # type: ignore[union-attr]


def test_a_request_that_fails_its_checks_fails_alone(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    """An over-long input with truncate false (413), and one with no tokens (400), queued with
    a good request: each gets its own error, the good one its answer, as if alone."""
    service, backend = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=5), block_first=True)  # fmt: skip
    _, too_long, empty, good = _queued_together(service, backend, [
        (["a dog", "the cat sat on the mat"], {"truncate": False}),
        (["the", "   "], RequestParams(add_special_tokens=False)),
        (["new york"], None),
    ])  # fmt: skip
    assert isinstance(too_long, InputTooLong) and "instance 1" in too_long.message
    assert isinstance(empty, InvalidInput) and "no tokens" in empty.message
    assert isinstance(good, EncoderResult)
    assert [call["input_ids"].shape for call in backend.calls] == [(1, 3), (1, 4)]
    alone_service, _ = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=5))  # fmt: skip
    assert good.predictions == infer(alone_service, ["new york"]).predictions


def test_a_request_the_tokenizer_refuses_fails_alone(
    make_service: Callable[..., Any], tokenizer: Any
) -> None:
    """A text the tokenizer cannot take (a Rust tokenizer's lone surrogate) fails its request;
    the others of the batch are tokenized again without it and answered."""
    service, backend = make_service(Task.sequence_classification, first_word_logits,
                                    block_first=True)  # fmt: skip
    plain = tokenizer.encode_batch

    def refusing(texts: Any, **kw: Any) -> Any:
        if any("\ud800" in t for t in texts):
            raise InvalidInput("input 0 is not valid Unicode text", param="input")
        return plain(texts, **kw)

    tokenizer.encode_batch = refusing
    _, good, bad = _queued_together(service, backend, [(["a dog"], None), (["a \ud800"], None)])
    assert isinstance(bad, InvalidInput) and "Unicode" in bad.message
    assert isinstance(good, EncoderResult) and good.token_count == 4


def test_a_batch_over_max_batch_tokens_runs_in_passes_within_it(
    make_service: Callable[..., Any],
) -> None:
    """Untokenized requests are grouped by estimated lengths: the budget holds on the real
    ones (the inputs here tokenize longer than their characters suggest)."""
    service, backend = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=64), max_batch_tokens=20)  # fmt: skip
    requests = [service.encode(texts, RequestParams()) for texts in (["a a a a a a"] * 2, ["a"])]
    untokenized = [EncodedRequest.untokenized(r.texts, RequestParams(), max_length=64)
                   for r in requests]  # fmt: skip
    assert all(r.seq_len < 8 for r in untokenized)  # the guess: 3 tokens
    outputs = service._run_batch(untokenized)
    shapes = [call["input_ids"].shape for call in backend.calls]
    assert all(rows * length <= 20 for rows, length in shapes), shapes
    assert sum(rows for rows, _ in shapes) == 3
    plain_service, _ = make_service(Task.token_classification, position_logits,
                                    info=ModelInfo(max_length=64))  # fmt: skip
    plain = plain_service._run_batch(requests)
    for got, want in zip(outputs, plain, strict=True):
        np.testing.assert_array_equal(got, want)


def second_token_score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A reranker's [N, 1] logit: the token after [CLS]."""
    return ids[:, 1:2].astype(np.float32)


def test_rerank_pairs_of_a_batch_are_tokenized_in_one_call(
    make_service: Callable[..., Any], tokenizer: Any
) -> None:
    service, backend = make_service(Task.rerank, second_token_score, block_first=True)
    first = [["paris", "new york"], ["a", "the cat sat"]]
    second = [["dog", "a dog"]]
    _, one, two = _queued_together(service, backend, [(first, None), (second, None)],
                                   blocker=[["john", "paris"]])  # fmt: skip
    pair_calls = [call["pairs"] for call in tokenizer.calls if "pairs" in call]
    assert pair_calls == [[("john", "paris")],  # the blocker, alone in the first pass
                          [("paris", "new york"), ("a", "the cat sat"), ("dog", "a dog")]]  # fmt: skip
    assert isinstance(one, EncoderResult) and isinstance(two, EncoderResult)
    assert one.token_count == 6 + 7 and two.token_count == 6
    assert backend.calls[1]["input_ids"].shape == (3, 7)  # both requests in one pass
    # Scores are the sigmoid of each pair's own logit (its query's first token id).
    for result, queries in ((one, ["paris", "a"]), (two, ["dog"])):
        logits = np.array([tokenizer.vocab[q] for q in queries], dtype=np.float64)
        np.testing.assert_allclose(result.outputs[0].data, 1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_merged_embeddings_ignore_the_other_request_padding(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    hidden = padding_poisoned_states(seed=3)
    (_, long_res, short_res), backend = _merged(make_service, Task.text_embedding, hidden)
    assert backend.calls[1]["input_ids"].shape == (5, 9)
    assert long_res.outputs[0].shape == [2, 6]
    assert short_res.outputs[0].shape == [3, 6]
    service, _ = make_service(Task.text_embedding, hidden)
    alone = infer(service, ["a dog", "new york", "paris"])
    np.testing.assert_allclose(short_res.outputs[0].data, alone.outputs[0].data, rtol=1e-6)


# --- pre-tokenized input --------------------------------------------------------------


def test_encode_token_ids(make_service: Callable[..., Any]) -> None:
    service, backend = make_service(Task.text_embedding, lambda ids, mask: np.ones((*ids.shape, 2)),
                                    info=ModelInfo(max_length=3, vocab_size=20))  # fmt: skip
    request = service.encode_token_ids([[5, 6, 7, 8], [9]], RequestParams())
    assert [e.ids for e in request.encodings] == [[5, 6, 7], [9]]  # truncated
    with pytest.raises(InputTooLong) as info:
        service.encode_token_ids([[5, 6, 7, 8]], RequestParams(truncate=False))
    assert info.value.param == "input"
    for bad in ([[]], [[5, 20]], [[-1]]):
        with pytest.raises(InvalidInput) as err:
            service.encode_token_ids(bad, RequestParams())
        assert err.value.param == "input"

    async def main() -> EncoderResult:
        await service.start()
        try:
            return await service.infer_encoded(request)
        finally:
            await service.stop()

    result = asyncio.run(main())
    assert result.outputs[0].shape == [2, 2]
    assert result.token_count == 4
    assert backend.calls[0]["input_ids"].tolist() == [[5, 6, 7], [9, PAD, PAD]]


# --- length buckets (remote predictors) ------------------------------------------------


@pytest.mark.parametrize(
    "length,max_length,bucket",
    [(1, 512, 16), (16, 512, 16), (17, 512, 32), (100, 512, 128), (300, 512, 512),
     (300, 384, 384), (20, 20, 20), (10, 8, 10)],
)  # fmt: skip
def test_length_bucket(length: int, max_length: int, bucket: int) -> None:
    assert length_bucket(length, max_length=max_length) == bucket


def test_bucketed_batches_are_padded_but_answers_are_unchanged(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    texts = ["the cat sat on the mat .", "a"]
    service, backend = make_service(Task.token_classification, position_logits,
                                    bucket_lengths=True)  # fmt: skip
    bucketed = infer(service, texts)
    assert backend.calls[0]["input_ids"].shape == (2, 16)  # 9 tokens -> the 16 bucket
    assert backend.calls[0]["attention_mask"][:, 9:].sum() == 0
    plain_service, plain_backend = make_service(Task.token_classification, position_logits)
    plain = infer(plain_service, texts)
    assert plain_backend.calls[0]["input_ids"].shape == (2, 9)
    assert bucketed.predictions == plain.predictions
    np.testing.assert_array_equal(bucketed.outputs[0].data, plain.outputs[0].data)


# --- length-sorted chunks -------------------------------------------------------------

CHUNK_TEXTS = [
    "the cat sat on the mat .",  # 9 tokens
    "a",  # 3
    "the cat sat",  # 5
    "a dog",  # 4
    "new york is big",  # 6
]


@pytest.mark.parametrize(
    ("task", "fn"),
    [
        (Task.token_classification, position_logits),
        (Task.sequence_classification, first_word_logits),
    ],
)
def test_chunked_batches_are_length_sorted_and_answer_as_one_pass(
    make_service: Callable[..., Any], task: Task, fn: Any
) -> None:
    service, backend = make_service(task, fn, chunk_rows=2)
    first = service.encode(CHUNK_TEXTS[:2], RequestParams())
    second = service.encode(CHUNK_TEXTS[2:], RequestParams())
    chunked = service._run_batch([first, second])
    # Sorted lengths 3 4 5 | 6 9: chunks of two rows, each padded to its own longest.
    assert [call["input_ids"].shape for call in backend.calls] == [(2, 4), (2, 6), (1, 9)]
    plain_service, plain_backend = make_service(task, fn)
    plain = plain_service._run_batch([first, second])
    assert [call["input_ids"].shape for call in plain_backend.calls] == [(5, 9)]
    for request, got, want in zip((first, second), chunked, plain, strict=True):
        assert got.shape == want.shape
        # Padding positions may differ between the passes; a row's own positions must not.
        for row, enc in enumerate(request.encodings):
            np.testing.assert_array_equal(got[row, : len(enc)], want[row, : len(enc)])


class ForwardTimes:
    """A ServingObserver keeping the forward-pass times it is told (nothing else is called
    by the service's model thread)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def forward_pass(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model thread reported {name}")


def test_each_forward_pass_is_timed_for_the_metrics(make_service: Callable[..., Any]) -> None:
    def slow_logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return first_word_logits(ids, mask)

    times = ForwardTimes()
    service, backend = make_service(
        Task.sequence_classification, slow_logits, chunk_rows=2, observer=times
    )
    service._run_batch([service.encode(CHUNK_TEXTS, RequestParams())])
    assert len(backend.calls) == 3  # chunks of 2 rows: one time per pass, not per batch
    assert len(times.seconds) == 3
    assert all(0.02 <= s < 5 for s in times.seconds)


def test_a_batch_of_at_most_chunk_rows_is_one_pass(make_service: Callable[..., Any]) -> None:
    service, backend = make_service(Task.sequence_classification, first_word_logits, chunk_rows=8)
    service._run_batch([service.encode(CHUNK_TEXTS, RequestParams())])
    assert [call["input_ids"].shape for call in backend.calls] == [(5, 9)]


def test_rows_of_like_lengths_stay_one_pass(make_service: Callable[..., Any]) -> None:
    """Chunks that would save under CHUNK_MIN_SAVING of the padding are not worth a pass."""
    service, backend = make_service(Task.sequence_classification, first_word_logits, chunk_rows=2)
    texts = ["a dog", "new york", "the cat", "the cat sat", "the cat sat"]  # 4 4 4 5 5 tokens
    service._run_batch([service.encode(texts, RequestParams())])
    # One pass pads 5 x 5 = 25 tokens; chunks (4 4) (4 5) (5) would pad 8 + 10 + 5 = 23.
    assert [call["input_ids"].shape for call in backend.calls] == [(5, 5)]


def test_chunked_embeddings_equal_one_pass(
    make_service: Callable[..., Any], infer: Callable[..., Any]
) -> None:
    hidden = padding_poisoned_states(seed=5)
    service, backend = make_service(Task.text_embedding, hidden, chunk_rows=2)
    chunked = infer(service, CHUNK_TEXTS)
    assert len(backend.calls) == 3
    plain_service, _ = make_service(Task.text_embedding, hidden)
    plain = infer(plain_service, CHUNK_TEXTS)
    np.testing.assert_allclose(chunked.outputs[0].data, plain.outputs[0].data, rtol=1e-6)
