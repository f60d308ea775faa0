"""Sampling parameters a generative backend receives (already validated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from lmserve_core.lora import LoRAAdapter

FinishReason = Literal["stop", "length", "abort"]

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]


# vLLM's _SAMPLING_EPS: temperatures below it sample greedily.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text: vLLM's ``structured_outputs``, one kind at a time.

    ``value`` by kind: ``json`` a JSON schema as JSON text; ``json_object`` "" (any JSON
    object); ``regex`` a regular expression; ``choice`` a JSON list of the allowed strings;
    ``grammar`` an EBNF (GBNF) or Lark grammar; ``structural_tag`` vLLM's/xgrammar's structural
    tag as JSON text. Frozen and hashable: backends cache what they compile from it.
    """

    kind: StructuredKind
    value: str = ""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # EOS and stop_token_ids cannot end the sequence before this many tokens (vLLM's).
    min_tokens: int = 0
    # Top-k alternatives to return per generated token (None: no logprobs at all).
    logprobs: int | None = None
    # Top-k alternatives per prompt token (echo with logprobs); None: none.
    prompt_logprobs: int | None = None
    # The generated text must match this (None: unconstrained).
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        """vLLM's rule: a temperature under 1e-5 is greedy (dividing logits by 1e-300 would tie
        every positive logit at infinity)."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class ReasoningGate(Protocol):
    """Where a thinking model's reasoning ends (the server's reasoning parser, one per sequence).

    With a reasoning parser, vLLM holds only the text after the reasoning to ``structured``: the
    constraint starts with the token after the one that ends the reasoning. Backends do the same.
    """

    @property
    def ended_in_prompt(self) -> bool | None:
        """True: constrain from the first token; False: the reasoning is still open; None:
        the backend asks ``ends_in`` about the prompt (vLLM's engine-side check)."""
        ...

    @property
    def parser_kwargs(self) -> dict[str, Any]:
        """What vLLM's engine builds its own copy of the parser with."""
        ...

    def ends_in(self, token_ids: Sequence[int]) -> bool:
        """Whether the reasoning has ended within ``token_ids`` (the prompt)."""
        ...

    def ends_with(self, token_ids: Sequence[int], delta_ids: Sequence[int]) -> bool:
        """Whether ``delta_ids``, the last of ``token_ids`` (prompt and output), end it."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # With priority scheduling, lower starts first (then arrival order), as in vLLM.
    priority: int = 0
    # With a reasoning parser and a constraint: the constraint waits for the reasoning's end.
    reasoning: ReasoningGate | None = None
    # The LoRA adapter this request runs with (None: the base model); the backend has it
    # loaded (AdapterBackend.add_adapter) for as long as a request names it.
    adapter: LoRAAdapter | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first
    rank: int | None = None  # of token_id among all tokens (1 = the most likely); prompt tokens


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of the sequence.

    ``finish_reason`` is set on the last event. An EOS or stop token that ends the
    sequence is reported with ``is_stop_token`` so the text layer can leave it out.
    """

    token_id: int | None
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None
    is_stop_token: bool = False
    # Only on the first event, when prompt logprobs were asked for; the first prompt
    # token has None (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # Only on the first event, when the backend knows it: seconds the request waited before
    # the engine scheduled it (the queue time in /metrics).
    queued_seconds: float | None = None
    # vLLM's stop_reason: the stop token that ended the sequence, unless it was the
    # tokenizer's own EOS (a generation config's extra EOS ids do count, as in vLLM).
    stop_reason: int | None = None
    # Only on the first event, when the backend has a prefix cache: prompt tokens it served
    # from it (usage.prompt_tokens_details).
    cached_tokens: int | None = None
