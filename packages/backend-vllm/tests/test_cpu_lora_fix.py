"""vLLM's CPU LoRA ops read slot -1 (a row without an adapter) as the last adapter's weights;
lmserve's vLLM plugin makes them leave such rows alone, as vLLM's GPU kernels do, and computes
each adapter's rows in one product: the same numbers as vLLM's ops wherever those are right."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from lmserve_backend_vllm import cpu_lora_fix  # noqa: E402


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    a = torch.randn(3, 1, 2, 8)  # three adapter slots, rank 2 (vLLM's stacked layout)
    b = torch.randn(3, 1, 8, 2)
    indices = torch.tensor([0, -1, 2, -1])
    return x, a, b, indices


def test_the_bug_exists_in_the_unpatched_op() -> None:
    """Slot -1 is the last slot: the reason for the fix (a newer vLLM may drop this test)."""
    x, a, _, indices = _case()
    original = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    out = torch.zeros(4, 2)
    original(x, a, out, indices, 1.0)
    assert torch.allclose(out[1], x[1] @ a[2, 0].T)  # row 1 ran with the last adapter


def test_rows_without_an_adapter_are_left_as_they_were() -> None:
    cpu_lora_fix.register()
    cpu_lora_fix.register()  # vLLM may load plugins more than once per process
    x, a, b, indices = _case()
    shrunk = torch.full((4, 2), 7.0)
    lora_ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
    assert torch.equal(shrunk[1], torch.full((2,), 7.0))
    assert torch.allclose(shrunk[0], 0.5 * x[0] @ a[0, 0].T)
    assert torch.allclose(shrunk[2], 0.5 * x[2] @ a[2, 0].T)
    base = torch.randn(4, 8)
    out = base.clone()
    lora_ops.bgmv_expand(shrunk, b, out, indices, True)
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])
    assert torch.allclose(out[0], base[0] + b[0, 0] @ shrunk[0])
    sliced = base.clone()
    lora_ops.bgmv_expand_slice(shrunk, b[:, :, :4], sliced, indices, 2, 4, True)
    assert torch.equal(sliced[1], base[1])
    assert torch.allclose(sliced[2, 2:6], base[2, 2:6] + b[2, 0, :4] @ shrunk[2])
    # The prefill ops call the patched ones: a sequence without an adapter is untouched too.
    seq = base.clone()
    lora_ops.sgmv_expand(shrunk, b, seq, torch.tensor([0, 2]), torch.tensor([2, 2]),
                         torch.tensor([-1, 0]), 2, 2, 4, True)  # fmt: skip
    assert torch.equal(seq[:2], base[:2])
    assert not torch.equal(seq[2:], base[2:])


def test_grouped_ops_give_vllms_numbers_on_adapter_rows() -> None:
    cpu_lora_fix.register()
    torch.manual_seed(1)
    x = torch.randn(6, 8)
    a = torch.randn(3, 1, 4, 8)
    b = torch.randn(3, 1, 10, 4)
    indices = torch.tensor([2, 0, 0, 1, 2, 0])  # every row has an adapter: vLLM's ops are right
    ops = {name: getattr(lora_ops, name) for name in ("bgmv_shrink", "bgmv_expand",
                                                      "bgmv_expand_slice")}  # fmt: skip
    for name, op in ops.items():
        original = op.__wrapped__
        for add in (True, False):
            if name == "bgmv_shrink":
                ours, theirs = torch.zeros(6, 4), torch.zeros(6, 4)
                op(x, a, ours, indices, 0.3)
                original(x, a, theirs, indices, 0.3)
            else:
                h = torch.randn(6, 4)
                start = torch.randn(6, 12)
                ours, theirs = start.clone(), start.clone()
                extra = (1, 10) if name == "bgmv_expand_slice" else ()
                op(h, b, ours, indices, *extra, add)
                original(h, b, theirs, indices, *extra, add)
            assert torch.allclose(ours, theirs, atol=1e-5), (name, add)
    # One input row broadcast to every output row: vLLM's op, kept as it was.
    out = torch.zeros(6, 12)
    lora_ops.bgmv_expand(torch.randn(1, 4), b, out, torch.tensor([1]), True)
    assert out.abs().sum() > 0 and torch.equal(out[0], out[5])


def test_a_rewritten_index_buffer_is_grouped_again() -> None:
    """Decode steps pass views of one buffer rewritten in place: the grouping cached for one
    step must not serve the next."""
    cpu_lora_fix.register()
    x, a, _, _ = _case()
    buffer = torch.tensor([0, 1, -1, 1, 2])
    first = torch.zeros(4, 2)
    lora_ops.bgmv_shrink(x, a, first, buffer[:4], 1.0)
    buffer.copy_(torch.tensor([2, 2, 0, -1, 1]))
    second = torch.zeros(4, 2)
    lora_ops.bgmv_shrink(x, a, second, buffer[:4], 1.0)
    expected = torch.stack([x[0] @ a[2, 0].T, x[1] @ a[2, 0].T, x[2] @ a[0, 0].T, torch.zeros(2)])
    assert torch.allclose(second, expected)


def test_vllm_finds_the_plugin() -> None:
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.value == "lmserve_backend_vllm.cpu_lora_fix:register" for p in plugins)


def _wrapper(indices: list[int]) -> object:
    """vLLM's CPU punica wrapper holding ``indices`` as its per-token slots (decode form)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper._token_lora_indices[: len(indices)] = torch.tensor(indices)
    wrapper.indices_len = [len(indices), len(indices), len(indices), len(indices)]
    wrapper.is_prefill = False
    wrapper.no_lora = all(i < 0 for i in indices)
    return wrapper


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_all_slots_linear_gives_vllms_numbers(scale: float) -> None:
    """Three slices (q/k/v) of different widths, slots padded to the max rank: the one-product
    form equals vLLM's per-slice shrink and expand on rows with an adapter and leaves rows
    without one as they were."""
    cpu_lora_fix.register()
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_linear.__wrapped__
    torch.manual_seed(2)
    widths = (12, 4, 4)
    a = tuple(torch.randn(3, 1, 4, 8) for _ in widths)
    b = tuple(torch.randn(3, 1, w, 4) for w in widths)
    x = torch.randn(6, 8)
    start = torch.randn(6, sum(widths))
    ours, theirs = start.clone(), start.clone()
    every_row = [2, 0, 0, 1, 2, 0]  # vLLM's own ops are right only when every row has one
    PunicaWrapperCPU.add_lora_linear(_wrapper(every_row), ours, x, a, b, scale, widths)
    original(_wrapper(every_row), theirs, x, a, b, scale, widths)
    assert not torch.allclose(ours, start)
    assert torch.allclose(ours, theirs, atol=1e-4)
    mixed = start.clone()
    PunicaWrapperCPU.add_lora_linear(_wrapper([2, -1, 0, -1, 2, 0]), mixed, x, a, b, scale, widths)
    assert torch.equal(mixed[[1, 3]], start[[1, 3]])
    assert torch.allclose(mixed[[0, 2, 4, 5]], theirs[[0, 2, 4, 5]], atol=1e-4)
    untouched = start.clone()
    PunicaWrapperCPU.add_lora_linear(_wrapper([-1] * 6), untouched, x, a, b, scale, widths)
    assert torch.equal(untouched, start)


def test_all_slots_linear_follows_adapter_loads_and_skips_zero_slots() -> None:
    """The live slots' weights are gathered once and reused: vLLM writing a slot in place
    (loading an adapter, or zeroing it for one without this module) must be seen next call."""
    cpu_lora_fix.register()
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_linear.__wrapped__
    torch.manual_seed(3)
    a, b = (torch.zeros(2, 1, 4, 8),), (torch.zeros(2, 1, 6, 4),)
    x, start = torch.randn(3, 8), torch.randn(3, 6)
    rows = [0, 1, 0]
    zero = start.clone()
    PunicaWrapperCPU.add_lora_linear(_wrapper(rows), zero, x, a, b, 1.0, (6,))
    assert torch.equal(zero, start)  # no slot has weights: a module no adapter targets
    a[0][1] = torch.randn(1, 4, 8)
    b[0][1] = torch.randn(1, 6, 4)
    ours, theirs = start.clone(), start.clone()
    PunicaWrapperCPU.add_lora_linear(_wrapper(rows), ours, x, a, b, 1.0, (6,))
    original(_wrapper([1, 1, 1]), theirs, x, a, b, 1.0, (6,))
    assert torch.equal(ours[[0, 2]], start[[0, 2]])
    assert torch.allclose(ours[1], theirs[1], atol=1e-5) and not torch.equal(ours[1], start[1])
    b[0][1] = 0  # the slot evicted: vLLM resets its weights
    evicted = start.clone()
    PunicaWrapperCPU.add_lora_linear(_wrapper(rows), evicted, x, a, b, 1.0, (6,))
    assert torch.equal(evicted, start)
