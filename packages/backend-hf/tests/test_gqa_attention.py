"""Grouped-query attention without the per-head copy of the cache (``gqa_attention``): the
engine's padded batches must give exactly the logits of transformers' own ``sdpa``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from transformers import LlamaConfig, LlamaForCausalLM

from lmserve_backend_hf.gqa_attention import NAME, use_gqa_sdpa


def _model(kv_heads: int, attn: str = "sdpa") -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                         max_position_embeddings=128, attn_implementation=attn)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _padded_decode(model: Any, steps: int = 6) -> list[torch.Tensor]:
    """A left-padded batch of three: prefill, then ``steps`` greedy decoding steps."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 9), generator=generator)
    mask = (torch.arange(9) >= torch.tensor([[0], [4], [7]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        pos = positions[:, -1:]
        for _ in range(steps):
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.long)], dim=1)
            pos = pos + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)  # fmt: skip
            logits.append(out.logits)
    return logits


def test_padded_batches_give_the_logits_of_sdpa_without_repeating_heads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model(kv_heads=2)
    repeats = {"n": 0}
    real_repeat = sdpa_module.repeat_kv

    def counting(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
        repeats["n"] += 1
        return real_repeat(hidden, n_rep)

    monkeypatch.setattr(sdpa_module, "repeat_kv", counting)
    expected = _padded_decode(model)
    assert repeats["n"] > 0  # transformers' sdpa copies the heads for masked batches
    assert use_gqa_sdpa(model, torch.device("cpu"))
    assert model.config._attn_implementation == NAME
    repeats["n"] = 0
    got = _padded_decode(model)
    assert repeats["n"] == 0
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_unpadded_calls_go_to_transformers_sdpa() -> None:
    model = _model(kv_heads=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        assert use_gqa_sdpa(model, torch.device("cpu"))
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.parametrize(
    ("kv_heads", "attn", "device"),
    [(4, "sdpa", "cpu"), (2, "eager", "cpu"), (2, "sdpa", "cuda")],
)
def test_other_models_keep_their_attention(kv_heads: int, attn: str, device: str) -> None:
    model = _model(kv_heads=kv_heads, attn=attn)
    assert not use_gqa_sdpa(model, torch.device(device))
    assert model.config._attn_implementation == attn
