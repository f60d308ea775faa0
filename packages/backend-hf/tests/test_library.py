"""``load_model``: the server's own model lifecycle from plain Python (tiny trained models)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from _support.tiny_model_checks import CHAT_ANSWERS, RAW_COMPLETIONS, SENTIMENT
from _support.tiny_models import model_path
from lmserve_backend_hf import load_model
from lmserve_core.errors import ModelNotReady
from lmserve_core.model_host import ModelState

pytestmark = pytest.mark.slow


def test_an_encoder_predicts_with_the_servers_batching_settings() -> None:
    texts = list(SENTIMENT)
    with load_model(model_path("sentiment"), max_batch_size=2, torch_threads=1) as model:
        assert model.task.value == "sequence_classification"
        assert model.host.state is ModelState.ready
        assert model.host.gate.running_slots == 2  # max_batch_size reached the serving path
        expected = [1 if label == "POSITIVE" else 0 for label in SENTIMENT.values()]
        assert model.predict(texts) == expected
        (labels,) = model.predict(["I love this"], {"output": "labels"})
        assert labels[0]["label"] == "POSITIVE"
        # Several threads at once: merged by the dynamic batcher, each gets its own answer.
        answers: dict[int, list[object]] = {}

        def ask(i: int) -> None:
            answers[i] = model.predict([texts[i % len(texts)]])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [answers[i] for i in range(8)] == [[expected[i % len(texts)]] for i in range(8)]
        host = model.host
    # Closing drained and stopped the model, as lmserve serve does on SIGTERM.
    assert host.state is ModelState.draining
    with pytest.raises(ModelNotReady):
        host.require(host.name)


def test_a_generator_completes_and_chats_greedily() -> None:
    prompt, answer = next(iter(RAW_COMPLETIONS.items()))
    question = next(iter(CHAT_ANSWERS))
    with load_model(model_path("llama"), torch_threads=1) as model:
        assert model.task.value == "text_generation"
        assert model.generate(prompt, max_tokens=8, temperature=0) == answer
        reply = model.chat([{"role": "user", "content": question}], max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == CHAT_ANSWERS[question]
        assert reply.choices[0].finish_reason == "stop"
        # <|im_end|> is the tokenizer's EOS: no stop_reason, as in vLLM.
        assert reply.choices[0].stop_reason is None
        # min_tokens: EOS is masked out until six tokens are out (the answer alone is shorter).
        plain = model.complete(prompt, max_tokens=12, temperature=0)
        longer = model.complete(prompt, max_tokens=12, temperature=0, min_tokens=6)
        assert plain.usage.completion_tokens < 6 <= longer.usage.completion_tokens
        assert longer.choices[0].text.startswith(plain.choices[0].text)


def test_an_in_process_encoder_gathers_64_and_forwards_length_sorted_chunks() -> None:
    """Without --max_batch_size the batch is the in-process default, forwarded in chunks."""
    with load_model(model_path("sentiment"), torch_threads=1) as model:
        service = model.host.service
        assert service is not None
        assert model.host.gate.running_slots == 64 and service.chunk_rows == 16
        shapes: list[tuple[int, ...]] = []
        forward = service.backend.forward

        def recording(inputs: Any) -> Any:
            shapes.append(tuple(inputs["input_ids"].shape))
            return forward(inputs)

        service.backend.forward = recording  # type: ignore[method-assign]
        long_text = "i love this movie " * 20  # pads every row of one pass to ~80 tokens
        texts = list(SENTIMENT) * 6 + [long_text]
        expected = [1 if label == "POSITIVE" else 0 for label in SENTIMENT.values()] * 6
        answers = model.predict(texts)
        assert answers[:-1] == expected and answers[-1] in (0, 1)
        # 31 rows: two length-sorted passes, the long text with the longest short ones.
        assert [rows for rows, _ in shapes] == [16, 15]
        assert shapes[0][1] <= 7 < shapes[1][1]
