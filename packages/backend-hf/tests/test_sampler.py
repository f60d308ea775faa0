"""The sampler's batched paths: greedy rows and plain sampled rows in one tensor op each,
with the same distributions as the one-row-at-a-time draw."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmserve_backend_hf.sampler import RowState, _draw, sample
from lmserve_core.generation.params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _row(generator: torch.Generator | None = None, **settings: Any) -> RowState:
    params = SamplingParams(max_tokens=4, **{"temperature": 1.0, **settings})
    return RowState(params, [0, 1], generator=generator)


def _batched_frequencies(n: int, **settings: Any) -> torch.Tensor:
    states = [_row(**settings) for _ in range(n)]
    assert all(s.plain_sampled for s in states)
    torch.manual_seed(0)
    tokens = [token for token, _ in sample(LOGITS.repeat(n, 1), states)]
    return torch.bincount(torch.tensor(tokens), minlength=LOGITS.numel()).float() / n


def _expected(**settings: Any) -> torch.Tensor:
    """The one-row draw's distribution, from its own steps (top-k, softmax, min-p, top-p)."""
    p = SamplingParams(max_tokens=4, **{"temperature": 1.0, **settings})
    row = LOGITS / p.temperature
    if p.top_k:
        row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(row, dim=-1)
    probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        ordered = ordered.masked_fill(torch.cumsum(ordered, 0) - ordered >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return probs / probs.sum()


@pytest.mark.parametrize(
    "settings",
    [{}, {"temperature": 0.7}, {"top_k": 2}, {"top_p": 0.8}, {"min_p": 0.2},
     {"temperature": 1.5, "top_k": 4, "top_p": 0.9}],
    ids=str,
)  # fmt: skip
def test_batched_rows_draw_from_the_one_row_distribution(settings: dict[str, Any]) -> None:
    n = 6000
    got = _batched_frequencies(n, **settings)
    want = _expected(**settings)
    # Tokens the settings exclude are never drawn; the rest within 5 standard errors.
    assert torch.all(got[want == 0] == 0)
    tolerance = 5 * torch.sqrt(want * (1 - want) / n) + 1e-9
    assert torch.all((got - want).abs() <= tolerance), (got, want)


def test_mixed_batch_each_row_follows_its_own_settings() -> None:
    seeded = _row(generator=torch.Generator().manual_seed(7), temperature=0.9)
    penalised = _row(repetition_penalty=1.3)
    greedy = _row(temperature=0.0)
    plain = _row(top_k=1)  # only the best token can be drawn
    logits = LOGITS.repeat(4, 1)
    tokens = [t for t, _ in sample(logits.clone(), [seeded, penalised, greedy, plain])]
    assert tokens[2] == 0 and tokens[3] == 0
    assert 0 <= tokens[1] < LOGITS.numel()
    # The seeded row draws what it draws alone: batching does not touch its generator.
    alone = _draw(LOGITS.clone(), _row(generator=torch.Generator().manual_seed(7), temperature=0.9))
    assert tokens[0] == alone


@pytest.mark.parametrize(
    "settings", [{"temperature": 1e-300}, {"temperature": 1e-300, "top_p": 0.5}]
)
def test_extreme_settings_in_a_batch_still_draw_the_best_token(settings: dict[str, Any]) -> None:
    states = [_row(**settings), _row(**settings)]
    tokens = [t for t, _ in sample(LOGITS.repeat(2, 1), states)]
    assert tokens == [0, 0]


def test_rows_without_a_seed_share_the_given_generator() -> None:
    """The engine passes its own generator: the same state draws the same batch."""
    states = [_row(temperature=1.2) for _ in range(8)]
    draws = [
        [
            t
            for t, _ in sample(
                LOGITS.repeat(8, 1), states, generator=torch.Generator().manual_seed(3)
            )
        ]
        for _ in range(2)
    ]
    assert draws[0] == draws[1]
