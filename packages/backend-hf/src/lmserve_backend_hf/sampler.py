"""Per-row logits processing and sampling for a batch of sequences with their own params.

Order as in vLLM: the structured-output grammar's mask (rows that have one), logit bias,
then repetition / presence / frequency penalties; then greedy argmax, or temperature, top-k,
top-p, min-p and a draw from the row's own (seeded) generator. Logprobs are the log-softmax of
the model's logits after the grammar's mask (where a row has one) and before any other
processing, as vLLM's.

Rows are grouped so that a step costs a few tensor ops, not a Python loop over rows: every
greedy row takes its token from one batched argmax, and every plain sampled row (temperature,
top-k, top-p, min-p; no penalties, bias, min-tokens mask or seed) is drawn in one batched
pass with per-row settings as tensors (vLLM's sampler does the same). Rows with a seed or
processing that depends on their history go one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmserve_core.generation.params import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from lmserve_backend_hf.structured import GrammarBitmask, RowGrammar


@dataclass
class RowState:
    """What sampling needs to know about one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    generator: torch.Generator | None = None
    # The tokens that would end the sequence (EOS, stop_token_ids): masked out until
    # ``params.min_tokens`` have been generated, as vLLM's min-tokens logits processor does.
    stop_ids: frozenset[int] = frozenset()
    # The structured-output matcher (``params.structured``), set when the engine admits the row.
    grammar: RowGrammar | None = None

    def add(self, token: int) -> None:
        self.output_ids.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1

    @property
    def below_min_tokens(self) -> bool:
        return len(self.output_ids) < self.params.min_tokens and bool(self.stop_ids)

    @property
    def unprocessed(self) -> bool:
        """No logits processing before the draw (no bias, penalties or min-tokens mask)."""
        p = self.params
        return (
            not p.logit_bias and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and not self.below_min_tokens
        )  # fmt: skip

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.unprocessed

    @property
    def plain_sampled(self) -> bool:
        """Drawn with the batch's shared random state: no seed of its own to follow."""
        return not self.params.greedy and self.unprocessed and self.generator is None


def _process_row(row: torch.Tensor, state: RowState) -> torch.Tensor:
    p = state.params
    if state.below_min_tokens:
        stops = torch.tensor(sorted(state.stop_ids), device=row.device)
        kept = row[stops] if state.grammar is not None else None
        row[stops] = float("-inf")
        # A grammar that can only end now (its mask allows nothing but stop tokens) wins over
        # min_tokens: masking them too would leave no token to sample.
        if kept is not None and bool(torch.isneginf(row).all()):
            row[stops] = kept
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(state.prompt_ids) | set(state.output_ids)), device=row.device
        )
        scores = row[seen]
        row[seen] = torch.where(
            scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and state.counts:
        ids = torch.tensor(list(state.counts), device=row.device)
        counts = torch.tensor(list(state.counts.values()), device=row.device, dtype=row.dtype)
        row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return row


def _finite(row: torch.Tensor) -> torch.Tensor:
    """Extreme but valid settings (a repetition penalty or temperature of 1e-300) push logits to
    infinity; softmax would turn them into NaN. The largest float keeps their order instead."""
    return torch.nan_to_num(row, nan=float("-inf"), posinf=torch.finfo(row.dtype).max)


def _draw(row: torch.Tensor, state: RowState) -> int:
    p = state.params
    if p.greedy:
        return int(row.argmax())
    row = _finite(row / p.temperature)
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the best token).
        drop = cumulative - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    generator = state.generator
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor,
    states: Sequence[RowState],
    bitmask: GrammarBitmask | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[int, TokenLogprob | None]]:
    """``logits`` [B, V] (float32); one (token, logprob) per row. ``generator``: the random
    state of rows without their own (torch's global one if None).

    Rows with a ``grammar`` are masked in place in ``logits`` with ``bitmask`` (required when
    any row has one); a row whose grammar allows no token at all gets token -1 (no logprob).
    """
    want_lp = [s.params.logprobs is not None for s in states]
    dead = _apply_grammars(logits, states, bitmask)
    # After the grammar's mask, as vLLM's sampler computes them (masked tokens are -inf).
    raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    tokens = _tokens(logits, states, dead, generator)
    out: list[tuple[int, TokenLogprob | None]] = []
    for i, (token, state) in enumerate(zip(tokens, states, strict=True)):
        if i in dead:
            out.append((-1, None))
            continue
        lp = None
        if raw_lp is not None and want_lp[i]:
            k = state.params.logprobs or 0
            top: tuple[tuple[int, float], ...] = ()
            if k:
                values, ids = torch.topk(raw_lp[i], k)
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            lp = TokenLogprob(token, float(raw_lp[i, token]), top)
        out.append((token, lp))
    return out


def _tokens(
    logits: torch.Tensor,
    states: Sequence[RowState],
    dead: set[int],
    generator: torch.Generator | None,
) -> list[int]:
    """One token per row: batched for greedy and plain sampled rows, per row for the rest."""
    if all(s.plain_greedy for s in states):
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    tokens = [-1] * len(states)
    greedy, batched = [], []
    for i, state in enumerate(states):
        if i in dead or state.plain_greedy:
            greedy.append(i)
        elif state.plain_sampled:
            batched.append(i)
        else:
            tokens[i] = _draw(_process_row(logits[i].clone(), state), state)
    if greedy:
        for i, token in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
            tokens[i] = int(token)
    if batched:
        drawn = _draw_batch(logits[batched], [states[i].params for i in batched], generator)
        for i, token in zip(batched, drawn, strict=True):
            tokens[i] = token
    return tokens


def _draw_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], generator: torch.Generator | None
) -> list[int]:
    """``_draw`` for many rows at once, from one ``generator``: each row's temperature, top-k,
    min-p and top-p as a column of a tensor, applied to the logits sorted once."""
    n, vocab = logits.shape
    device, dtype = logits.device, logits.dtype
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=dtype)
    scaled = _finite(logits / temperature.unsqueeze(1))
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    positions = torch.arange(vocab, device=device).expand(n, vocab)
    top_k = torch.tensor([p.top_k if p.top_k else vocab for p in params], device=device)
    # Top-k by value, as ``_draw``: ties with the k-th logit are kept.
    kth = ordered.gather(1, (top_k.clamp(1, vocab) - 1).unsqueeze(1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)  # sorted: column 0 holds each row's best token
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=dtype).unsqueeze(1)
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    # top_p 1 is off (as in ``_draw``): a cumulative sum that rounds up to 1 must not cut the tail.
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params],
                         device=device, dtype=dtype).unsqueeze(1)  # fmt: skip
    # Keep the smallest prefix whose mass reaches top_p (always the best token).
    drop = (torch.cumsum(probs, dim=-1) - probs >= top_p) & (positions > 0)
    probs = probs.masked_fill(drop, 0.0)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
        order = order.to(generator.device)
    picked = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return [int(t) for t in order.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()]


def _apply_grammars(
    logits: torch.Tensor, states: Sequence[RowState], bitmask: GrammarBitmask | None
) -> set[int]:
    """Mask the grammar rows of ``logits`` in place; the rows left with no token at all."""
    rows = [
        (i, s.grammar)
        for i, s in enumerate(states)
        if s.grammar is not None and not s.grammar.terminated
    ]
    if not rows:
        return set()
    if bitmask is None:
        raise ValueError("rows with a grammar need a GrammarBitmask")
    return set(bitmask.apply(logits, rows))


def prompt_logprobs(
    logits: torch.Tensor, prompt: list[int], k: int
) -> tuple[TokenLogprob | None, ...]:
    """Logprob of each prompt token given the ones before it; ``logits`` [L, V]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out: list[TokenLogprob | None] = [None]
    for t in range(1, len(prompt)):
        row = lp[t - 1]
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, ids = torch.topk(row, k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        chosen = row[prompt[t]]
        rank = int((row > chosen).sum()) + 1
        out.append(TokenLogprob(prompt[t], float(chosen), top, rank))
    return tuple(out)
