"""The growing KV cache (``kv_cache``): appends, joins and leaves must give exactly the tensors
the engine built before by concatenation, in buffers that are written in place."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lmserve_backend_hf.kv_cache import GrowingLayer, GrowingTensor, fill_holes, make_growing

H, D = 2, 4


def _states(rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, H, width, D), generator=generator)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    pad = t.new_zeros((t.shape[0], t.shape[1], width - t.shape[2], t.shape[3]))
    return torch.cat([pad, t], dim=2)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_appends_equal_concatenation_and_write_in_place() -> None:
    plain = DynamicLayer()
    plain.update(_states(3, 5, 0), _states(3, 5, 1))
    grown = GrowingLayer.adopt(plain)
    assert grown.capacity == (3, 16)
    storages = set()
    for step in range(40):
        k, v = _states(3, 1, 10 + step), _states(3, 1, 100 + step)
        want_k, want_v = plain.update(k, v)
        got_k, got_v = grown.update(k, v)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert got_k is grown.keys and grown.get_seq_length() == 6 + step
        storages.add(_storage(got_k))
    # 5 + 40 positions from a capacity of 16: reallocated twice (16 -> 34 -> 70), not per step.
    assert len(storages) == 3
    assert grown.capacity == (3, 70)


def test_views_handed_to_the_model_share_the_buffer() -> None:
    buffer = GrowingTensor(_states(2, 3, 0))
    first = buffer.view
    second = buffer.append(_states(2, 1, 1))
    assert _storage(first) == _storage(second)  # no copy of the cached positions
    assert second.shape == (2, H, 4, D) and torch.equal(second[:, :, :3], first)
    assert not second.is_contiguous()  # a window of a larger buffer


@pytest.mark.parametrize("joining_width", [2, 6, 9])
def test_extend_equals_left_padded_concatenation(joining_width: int) -> None:
    running = _states(3, 6, 0)
    joining = _states(2, joining_width, 1)
    buffer = GrowingTensor(running)
    buffer.select([0, 1, 2], trim=2)  # leading padding dropped earlier: room on the left
    buffer.extend(joining)
    width = max(4, joining_width)
    want = torch.cat([_pad_left(running[:, :, 2:], width), _pad_left(joining, width)], dim=0)
    assert torch.equal(buffer.view, want)
    assert buffer.capacity[0] >= 5
    # Appending after the join still lines up with every row.
    step = _states(5, 1, 2)
    assert torch.equal(buffer.append(step), torch.cat([want, step], dim=2))


def test_extend_into_spare_room_does_not_reallocate() -> None:
    buffer = GrowingTensor(_states(4, 3, 0))
    buffer.select([0, 1], trim=1)  # two rows free, one position free on the left
    before = _storage(buffer.view)
    buffer.extend(_states(2, 3, 1))
    assert _storage(buffer.view) == before and buffer.rows == 4 and buffer.width == 3


def test_select_equals_index_select_and_trim() -> None:
    original = _states(6, 7, 0)
    buffer = GrowingTensor(original)
    kept = [0, 2, 3, 5]
    order = fill_holes(kept)
    assert order == [0, 5, 2, 3]
    buffer.select(order, trim=3)
    assert torch.equal(buffer.view, original[order][:, :, 3:])
    # An arbitrary permutation is honoured too.
    buffer.select([3, 2, 1, 0])
    assert torch.equal(buffer.view, original[order][:, :, 3:].flip(0))


@pytest.mark.parametrize(
    ("kept", "order"),
    [
        ([0, 1, 2], [0, 1, 2]),
        ([1, 2], [1, 2][::-1]),
        ([4], [4]),
        ([], []),
        ([0, 3, 4], [0, 3, 4]),
        ([0, 2, 5, 6], [0, 5, 2, 6]),
    ],
)
def test_fill_holes_moves_only_rows_beyond_the_new_size(kept: list[int], order: list[int]) -> None:
    assert fill_holes(kept) == order
    assert sorted(order) == kept


def test_assigning_keys_copies_into_a_new_buffer() -> None:
    plain = DynamicLayer()
    plain.update(_states(2, 5, 0), _states(2, 5, 1))
    grown = GrowingLayer.adopt(plain)
    grown.crop(-2)  # transformers' own crop assigns sliced tensors
    plain.crop(-2)
    assert torch.equal(grown.keys, plain.keys) and grown.get_seq_length() == 3
    k = _states(2, 1, 2)
    assert torch.equal(grown.update(k, k)[0], plain.update(k, k)[0])


def test_make_growing_keeps_other_layer_kinds() -> None:
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]
    for layer in cache.layers:
        layer.update(_states(1, 3, 0), _states(1, 3, 1))
    make_growing(cache)
    assert type(cache.layers[0]) is GrowingLayer
    assert type(cache.layers[1]) is DynamicSlidingWindowLayer
    grown = cache.layers[0]
    make_growing(cache)  # idempotent
    assert cache.layers[0] is grown


# --- on a real model -----------------------------------------------------------------------
pytest_slow = pytest.mark.slow


def _llama() -> Any:
    from transformers import AutoModelForCausalLM

    from _support.tiny_models import model_path

    return AutoModelForCausalLM.from_pretrained(model_path("llama")).eval()


@pytest_slow
def test_model_decodes_the_same_logits_from_a_growing_cache() -> None:
    model = _llama()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        caches = []
        for grow in (False, True):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            if grow:
                make_growing(out.past_key_values)
            caches.append((out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)))
        (plain, token), (grown, _) = caches
        step_mask, pos = mask, positions[:, -1:]
        for _ in range(12):
            step_mask = torch.cat([step_mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
            pos = pos + 1
            a = model(input_ids=token, attention_mask=step_mask, position_ids=pos,
                      past_key_values=plain, use_cache=True).logits  # fmt: skip
            b = model(input_ids=token, attention_mask=step_mask, position_ids=pos,
                      past_key_values=grown, use_cache=True).logits  # fmt: skip
            assert torch.equal(a, b)
            token = a[:, -1].argmax(-1, keepdim=True)
    assert all(type(layer) is GrowingLayer for layer in grown.layers)
    assert grown.get_seq_length() == plain.get_seq_length() == 16


def _engine(max_num_seqs: int) -> Any:
    from _support.tiny_models import model_path
    from lmserve_backend_hf import create_backend
    from lmserve_core.backend import LoadRequest
    from lmserve_core.model_files import ModelSource, read_model_config
    from lmserve_core.settings import ServeSettings
    from lmserve_core.tasks import Task

    path = model_path("llama")
    request = LoadRequest(ServeSettings(torch_threads=1, max_num_seqs=max_num_seqs),
                          ModelSource(path, str(path)), Task.text_generation,
                          read_model_config(path))  # fmt: skip
    return create_backend(request).backend


def _watch_layer_kinds(engine: Any) -> set[type]:
    """The cache layer types of every group after each decode step, as the engine runs."""
    kinds: set[type] = set()
    decode = engine._decode

    def watched() -> None:
        decode()
        kinds.update(type(layer) for g in engine._groups for layer in g.cache.layers)

    engine._decode = watched
    return kinds


@pytest_slow
def test_a_lone_row_decodes_on_plain_layers() -> None:
    """One stream: nothing joins, so its cache stays transformers' own (a one-row torch.cat is
    cheaper than a buffer's write); its tokens equal generate()'s."""
    from lmserve_core.generation.params import GenerationRequest, SamplingParams

    engine = _engine(max_num_seqs=4)
    kinds = _watch_layer_kinds(engine)
    prompt = [5, 6, 7, 8]

    async def run() -> list[int]:
        await engine.start()
        try:
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            stream = engine.generate(GenerationRequest("alone", prompt, params))
            return [e.token_id async for e in stream if e.token_id is not None]
        finally:
            await engine.stop()

    tokens = asyncio.run(run())
    assert kinds == {DynamicLayer}
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                    do_sample=False, eos_token_id=-1, pad_token_id=0)  # fmt: skip
    assert tokens == out[0, len(prompt) :].tolist()


@pytest_slow
def test_engine_joins_and_leaves_keep_greedy_tokens_of_generate() -> None:
    """Three slots, six requests of different lengths and token counts: rows leave from the
    middle of the batch and newcomers (shorter and longer prompts) join it, all in the growing
    cache; every request's tokens equal transformers' serial greedy generate()."""
    from lmserve_core.generation.params import GenerationRequest, SamplingParams

    engine = _engine(max_num_seqs=3)
    jobs = [([5, 6, 7], 9), (list(range(10, 30)), 4), ([40, 41], 12),
            (list(range(50, 62)), 6), ([70, 71, 72, 73], 3), (list(range(80, 105)), 7)]  # fmt: skip
    layer_kinds = _watch_layer_kinds(engine)

    async def run() -> list[list[int]]:
        await engine.start()
        try:

            async def one(i: int, prompt: list[int], n: int) -> list[int]:
                params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                stream = engine.generate(GenerationRequest(f"r{i}", prompt, params))
                return [e.token_id async for e in stream if e.token_id is not None]

            return list(await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs))))
        finally:
            await engine.stop()

    got = asyncio.run(run())
    assert layer_kinds == {GrowingLayer}
    assert engine.max_step_size == 3
    model = engine.model
    with torch.inference_mode():
        for (prompt, n), tokens in zip(jobs, got, strict=True):
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, eos_token_id=-1, pad_token_id=0)  # fmt: skip
            assert tokens == out[0, len(prompt) :].tolist()
