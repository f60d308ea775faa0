"""A fix for vLLM's CPU LoRA ops: rows without an adapter stay the base model's, each adapter's
rows take one matrix product instead of one weight copy per token, and a linear layer's LoRA
costs a few products per slice however many adapters share the batch.

vLLM marks a token that runs without LoRA with the adapter slot index -1. Its GPU kernels skip
such rows; the PyTorch ops its CPU backend uses (``vllm.lora.ops.torch_ops``) index the stacked
weights with it, and ``weights[-1]`` is the *last* slot: in a batch that mixes base requests with
adapter requests, the base rows ran with whichever adapter held that slot (vLLM 0.32's own server
on CPU answered base requests with an adapter's answer; tests/test_lora_e2e.py shows it). Those
ops also gather a full ``[out, in]`` weight matrix for every token (``weights[indices]``), which
on a prompt of a few hundred tokens moves gigabytes per step.

Here the three row ops group the rows by slot: for each adapter of the batch one product of its
rows with its weights, rows marked -1 left as they were (what the GPU kernels do). The sgmv
(prefill) ops call them through their module, so they are fixed too. A shape the grouped form
does not cover (one input row broadcast to many) keeps vLLM's op, with the -1 rows restored.

The linear layers (what adapters mostly target) skip those ops altogether: vLLM's V1 runner marks
every step a prefill, so each LoRA layer ran the sgmv ops, which re-derive the per-token slots
and, with the grouping above, issue a handful of small ops per adapter per slice.
``add_lora_linear`` below instead computes every slot's low-rank product for every row in one
matrix product per slice (the ranks are tiny, so the extra flops are few), zeroes the products of
slots a row does not use with a mask, and adds the expansion with one more product: about four
ops per slice however many adapters share the batch. The stacked weights of the slots in use
are gathered once per adapter load, not per step, and a module no loaded adapter targets (vLLM
wraps every linear layer, zero weights included) costs nothing.

It is a vLLM general plugin (entry point group ``vllm.general_plugins``): vLLM runs it in every
process it starts (API server, engine core, workers) before any model loads. GPUs use other
kernels and are untouched.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # vLLM has imported torch by the time these run
    import torch

logger = logging.getLogger(__name__)

_PATCHED = "__lmserve_grouped_by_slot__"


# The last grouping: (the index buffer it came from, its version, offset, rows) and the groups.
_plan: tuple[Any, int, int, int, list[tuple[int, torch.Tensor]]] | None = None


def _slots(indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(slot, its rows) for each adapter slot in ``indices``; -1 (no adapter) left out.

    Every LoRA layer of a decode step gets a view of the same index buffer (the punica
    wrapper's, rewritten in place between steps, which bumps its version): for those the
    grouping is worked out once per step, not once per layer. Any other index tensor (the
    prefill ops' own) is grouped afresh."""
    global _plan
    base = indices._base
    if base is not None:
        key = (indices.storage_offset(), indices.shape[0])
        plan = _plan
        if plan is not None and plan[0] is base and plan[1] == base._version and plan[2:4] == key:
            return iter(plan[4])
    groups = [(slot, (indices == slot).nonzero(as_tuple=True)[0])
              for slot in indices.unique().tolist() if slot >= 0]  # fmt: skip
    if base is not None:
        _plan = (base, base._version, *key, groups)
    return iter(groups)


def _weights(stacked: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    weights = stacked[slot]
    if weights.dim() == 3:  # [1, out, in] in vLLM's stacked layout
        weights = weights.squeeze(0)
    return weights.to(dtype)


def bgmv_shrink(
    inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor, scaling: float = 1.0,
) -> None:  # fmt: skip
    x = inputs.to(output_tensor.dtype)
    for slot, rows in _slots(lora_indices_tensor):
        w = _weights(lora_a_weights, slot, output_tensor.dtype)
        output_tensor[rows, : w.shape[0]] = scaling * (x[rows] @ w.T)


def bgmv_expand(
    inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor, add_inputs: bool = True,
) -> None:  # fmt: skip
    x = inputs.to(output_tensor.dtype)
    for slot, rows in _slots(lora_indices_tensor):
        w = _weights(lora_b_weights, slot, output_tensor.dtype)
        # vLLM's: the adapter and the model may pad their output dimension differently.
        width = min(w.shape[0], output_tensor.shape[1])
        out = x[rows] @ w[:width].T
        if add_inputs:
            output_tensor[rows, :width] += out
        else:
            output_tensor[rows, :width] = out


def bgmv_expand_slice(
    inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
) -> None:  # fmt: skip
    x = inputs.to(output_tensor.dtype)
    end = slice_offset + slice_size
    for slot, rows in _slots(lora_indices_tensor):
        out = x[rows] @ _weights(lora_b_weights, slot, output_tensor.dtype).T
        if add_inputs:
            output_tensor[rows, slice_offset:end] += out
        else:
            output_tensor[rows, slice_offset:end] = out


@dataclass(frozen=True)
class _LiveSlots:
    """One slice of a LoRA layer, prepared for ``add_lora_linear``: only the slots whose
    weights are not zero (vLLM zeroes a slot's weights for an adapter without this module, so
    a module no adapter targets has none), their shrink weights stacked as one matrix and
    their expand weights as another."""

    columns: torch.Tensor  # [live * rank]: the slot each shrink column belongs to
    shrink: torch.Tensor  # [live * rank, in], float32 as vLLM's CPU shrink
    expand: torch.Tensor  # [live * rank, out], the output's dtype


# id(lora_a slice) -> (a weak reference to it, the weights' versions and dtype, its live slots).
_live: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, int, Any], _LiveSlots]] = {}


def _live_slots(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> _LiveSlots:
    """``a`` [slots, 1, rank, in] and ``b`` [slots, 1, out, rank] as ``_LiveSlots``, rebuilt
    only when vLLM writes either (loading or evicting an adapter bumps their versions)."""
    import torch

    key = (a._version, b._version, dtype)
    cached = _live.get(id(a))
    if cached is not None and cached[0]() is a and cached[1] == key:
        return cached[2]
    slots, _, rank, width_in = a.shape
    live = [s for s in range(slots) if bool(a[s].any()) and bool(b[s].any())]
    prepared = _LiveSlots(
        columns=torch.tensor(live, dtype=torch.long).repeat_interleave(rank),
        shrink=a[live, 0].reshape(len(live) * rank, width_in).float().contiguous(),
        expand=b[live, 0].transpose(1, 2).reshape(len(live) * rank, b.shape[2]).to(dtype),
    )
    _live[id(a)] = (weakref.ref(a), key, prepared)
    return prepared


def add_lora_linear(
    self: Any, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
    *, buffer: Any = None, **kwargs: Any,
) -> None:  # fmt: skip
    """vLLM's ``PunicaWrapperCPU.add_lora_linear`` semantics (``y[i] += x[i] @ A[slot_i].T @
    B[slot_i].T * scale`` per slice, nothing for slot -1) for all live slots at once: one
    product for every token's shrink on every live slot, a mask keeping each token's own slot,
    one product for the expansion. Shrink in float32 as vLLM's CPU ops do."""
    if self.no_lora:  # no token of the batch has an adapter (vLLM's prefill ops return too)
        return
    x = x.reshape(-1, x.shape[-1]).float()
    out = y.view(-1, y.shape[-1])
    indices = self.token_lora_indices.unsqueeze(1)
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        live = _live_slots(a, b, out.dtype)
        if live.columns.numel():
            ranks = (x @ live.shrink.T).mul_(indices == live.columns)
            if scale != 1.0:
                ranks.mul_(scale)
            width = min(live.expand.shape[1], size)
            out[:, offset : offset + width] += ranks.to(out.dtype) @ live.expand[:, :width]
        offset += size


_GROUPED: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}  # fmt: skip


def _row_wise(grouped: Callable[..., None], original: Callable[..., Any]) -> Callable[..., Any]:
    """``grouped`` when inputs, output and indices have a row each; else vLLM's ``original``
    with the rows marked -1 put back as they were."""

    def run(*args: Any, **kwargs: Any) -> Any:
        inputs, output, indices = args[0], args[2], args[3]
        rows = indices.shape[0]
        if inputs.shape[0] == rows and output.shape[0] == rows:
            return grouped(*args, **kwargs)
        base = indices < 0
        if not bool(base.any()) or output.shape[0] != rows:
            return original(*args, **kwargs)
        kept = output[base].clone()
        args = (*args[:3], indices.clamp(min=0), *args[4:])
        result = original(*args, **kwargs)
        output[base] = kept
        return result

    run.__wrapped__ = original  # type: ignore[attr-defined]
    run.__name__ = original.__name__
    setattr(run, _PATCHED, True)
    return run


def register() -> None:
    """vLLM's plugin hook: patch the ops where the CPU punica wrapper and the sgmv ops (which
    call the bgmv ones by module global) look them up. Safe to run more than once."""
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules has nothing to fix here
        return
    for name, grouped in _GROUPED.items():
        original = getattr(lora_ops, name)
        if getattr(original, _PATCHED, False):
            continue
        fixed = _row_wise(grouped, original)
        for module in (lora_ops, torch_ops, punica_cpu):
            if getattr(module, name, None) is original:
                setattr(module, name, fixed)
    wrapper = punica_cpu.PunicaWrapperCPU
    if not getattr(wrapper.add_lora_linear, _PATCHED, False):
        add_lora_linear.__wrapped__ = wrapper.add_lora_linear  # type: ignore[attr-defined]
        setattr(add_lora_linear, _PATCHED, True)
        wrapper.add_lora_linear = add_lora_linear  # type: ignore[method-assign]
    logger.debug(
        "vLLM's CPU LoRA ops: grouped by adapter slot, rows without one untouched; "
        "linear layers in one product per slice over the live slots"
    )
