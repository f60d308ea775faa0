"""A fix for vLLM's CPU LoRA kernels: rows without an adapter must stay the base model's.

vLLM marks a token that runs without LoRA with the adapter slot index -1. Its GPU kernels skip
such rows; the PyTorch kernels its CPU backend uses (``vllm.lora.ops.torch_ops``) index the
stacked weights with it, and ``weights[-1]`` is the *last* slot: in a batch that mixes base
requests with adapter requests, the base rows run with whichever adapter holds that slot (vLLM
0.32's own server on CPU answers base requests with an adapter's answer; tests/test_lora_e2e.py
shows it). Here every op leaves the rows marked -1 as it found them, which is what the GPU
kernels do.

It is a vLLM general plugin (entry point group ``vllm.general_plugins``): vLLM runs it in every
process it starts (API server, engine core, workers) before any model loads. It changes nothing
when no row is -1, and nothing on GPUs (their kernels live elsewhere).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# op name -> position of (output_tensor, lora_indices_tensor) in its arguments.
_BGMV = {"bgmv_shrink": (2, 3), "bgmv_expand": (2, 3), "bgmv_expand_slice": (2, 3)}
_PATCHED = "__lmserve_base_rows_kept__"


def _keeping_base_rows(
    op: Callable[..., Any], output_at: int, indices_at: int
) -> Callable[..., Any]:
    @functools.wraps(op)
    def run(*args: Any, **kwargs: Any) -> Any:
        output, indices = args[output_at], args[indices_at]
        base = indices < 0
        if not bool(base.any()) or output.shape[0] != indices.shape[0]:
            return op(*args, **kwargs)
        kept = output[base].clone()
        # Any valid slot computes something for those rows; it is thrown away below.
        args = (*args[:indices_at], indices.clamp(min=0), *args[indices_at + 1 :])
        result = op(*args, **kwargs)
        output[base] = kept
        return result

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
    for name, (output_at, indices_at) in _BGMV.items():
        original = getattr(lora_ops, name)
        if getattr(original, _PATCHED, False):
            continue
        fixed = _keeping_base_rows(original, output_at, indices_at)
        for module in (lora_ops, torch_ops, punica_cpu):
            if getattr(module, name, None) is original:
                setattr(module, name, fixed)
    logger.debug("vLLM's CPU LoRA ops leave rows without an adapter untouched")
