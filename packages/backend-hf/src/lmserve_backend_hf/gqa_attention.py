"""SDPA attention that does not copy the KV cache for grouped-query attention models on CPU.

transformers' ``sdpa`` attention repeats every key/value head for its query heads (a copy of the
layer's whole cache, times the group size, per layer and step) whenever an attention mask is
given, because CUDA's fused kernels refuse grouped-query attention with a mask. The engine's
left-padded batches always pass a mask. torch's CPU flash-attention kernel takes the mask and
``enable_gqa`` together and reads each key/value head for its query heads in place, with the
same arithmetic per head. Every other case goes to transformers' own function unchanged.

The engine switches a model to it (``use_gqa_sdpa``) only when the model runs ``sdpa`` on the
CPU and has grouped heads; the mask is built exactly as for ``sdpa``.
"""

from __future__ import annotations

from typing import Any

# Imported only by the engine, itself imported inside create_backend (as engine.py's imports).
import torch

NAME = "lmserve_sdpa_gqa"


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import (
        sdpa_attention_forward,
    )

    groups = getattr(module, "num_key_value_groups", 1)
    if (
        attention_mask is None  # transformers' own path already uses enable_gqa here
        or groups == 1
        or query.device.type != "cpu"
        or position_bias is not None
        or cache is not None
        or kwargs.get("output_attentions", False)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, position_bias=position_bias, cache=cache, **kwargs,
        )  # fmt: skip
    # With a mask, transformers' function never asks for a causal kernel either.
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=False, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: Any, device: torch.device) -> bool:
    """Switch a decoder-only ``model`` that runs ``sdpa`` with grouped heads on the CPU to
    ``gqa_sdpa_forward``; False (model unchanged) otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if (
        device.type != "cpu"
        or getattr(config, "is_encoder_decoder", False)
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or not heads
        or not kv_heads
        or heads == kv_heads
    ):
        return False
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    # The same masks as sdpa (an unknown name would get no mask at all).
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
    return True


__all__ = ["NAME", "gqa_sdpa_forward", "use_gqa_sdpa"]
