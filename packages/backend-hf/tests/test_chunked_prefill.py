"""Chunked prefill in the Hugging Face generation engine (``--max_num_batched_tokens``): a step
processes at most that many tokens, so prompts are grouped while they fit and a longer one is
prefilled in pieces between the running streams' decoding steps. The tokens must not change:
greedy outputs equal those of an engine whose budget holds every prompt whole."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from _support.tiny_models import model_path
from lmserve_backend_hf import create_backend
from lmserve_core.backend import LoadRequest
from lmserve_core.generation.params import GenerationRequest, SamplingParams
from lmserve_core.model_files import ModelSource, read_model_config
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

pytestmark = pytest.mark.slow

# Lengths 3 to 40 tokens: with a budget of 8 the long ones go in pieces, the short ones grouped.
PROMPTS = [
    [5, 6, 7],
    list(range(10, 50)),
    [20, 21, 22, 23, 24, 25],
    list(range(60, 83)),
    [90, 91],
    list(range(100, 117)),
]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine(**settings: Any) -> Any:
    path = model_path("llama")
    request = LoadRequest(ServeSettings(torch_threads=1, **settings), ModelSource(path, str(path)),
                          Task.text_generation, read_model_config(path))  # fmt: skip
    return create_backend(request).backend


async def _tokens(engine: Any, name: str, prompt: list[int], params: SamplingParams) -> list[int]:
    request = GenerationRequest(name, list(prompt), params)
    return [e.token_id async for e in engine.generate(request) if e.token_id is not None]


def _all_at_once(engine: Any, prompts: list[list[int]]) -> list[list[int]]:
    async def main() -> list[list[int]]:
        await engine.start()
        try:
            jobs = (_tokens(engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts))
            return list(await asyncio.gather(*jobs))
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_pieces_and_groups_give_the_tokens_of_whole_prompts() -> None:
    whole = _all_at_once(_engine(max_num_seqs=8, max_num_batched_tokens=4096), PROMPTS)
    chunked_engine = _engine(max_num_seqs=8, max_num_batched_tokens=8)
    assert chunked_engine.max_num_batched_tokens == 8
    chunked = _all_at_once(chunked_engine, PROMPTS)
    assert chunked == whole
    assert all(len(tokens) == GREEDY.max_tokens for tokens in chunked)


def test_a_long_prompt_is_prefilled_between_decoding_steps_of_a_running_stream() -> None:
    """Budget 8, one stream running: a 40-token prompt takes six steps of 7-token pieces, and
    the running stream gets a token in each of them instead of waiting for the whole prefill."""
    engine = _engine(max_num_seqs=4, max_num_batched_tokens=8)
    order: list[str] = []

    async def follow(name: str, prompt: list[int], tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        async for _event in engine.generate(GenerationRequest(name, prompt, params)):
            order.append(name)
            if name == "running" and len(order) == 2:
                arrived.set()

    async def main() -> None:
        await engine.start()
        try:
            running = asyncio.ensure_future(follow("running", [5, 6, 7], 30))
            await arrived.wait()  # two tokens in: it is decoding
            order.append("long arrives")
            await follow("long", list(range(10, 50)), 2)
            await running
        finally:
            await engine.stop()

    arrived = asyncio.Event()
    asyncio.run(main())
    arrival = order.index("long arrives")
    first = order.index("long")
    between = order[arrival + 1 : first].count("running")
    assert between >= 4, order  # ceil(40 / 7) = 6 pieces, each beside a decoding step


def test_budget_below_max_num_seqs_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least --max_num_seqs"):
        ServeSettings(max_num_seqs=32, max_num_batched_tokens=16)


def test_default_budget_follows_max_num_seqs() -> None:
    assert _engine(max_num_seqs=4).max_num_batched_tokens == 512
    assert _engine(max_num_seqs=600).max_num_batched_tokens == 600


def test_each_prefilling_iteration_is_logged_within_the_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At debug level the engine logs each iteration that prefills: the tokens (padding
    included) never exceed the budget, and every prompt token is read."""
    engine = _engine(max_num_seqs=8, max_num_batched_tokens=8)
    with caplog.at_level("DEBUG", logger="lmserve_backend_hf.engine"):
        _all_at_once(engine, PROMPTS)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration:")]
    prefilled = [int(line.split()[2]) for line in lines]
    assert lines and all(0 < p <= 8 for p in prefilled), lines
    assert sum(prefilled) >= sum(len(p) for p in PROMPTS)
