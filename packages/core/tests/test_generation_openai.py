"""The OpenAI generation layer (prepare + service) against fakes: no torch, no transformers.

FakeByteTokenizer: one token per UTF-8 byte (so "é" and "€" span several tokens), BOS
and EOS specials (BOS only before a non-empty text, so "" encodes to no token at all), decode with ``errors="replace"`` like a real byte-level tokenizer, and
a tiny chat "template" (a per-message format string).

ScriptedBackend: ``generate()`` is an async generator that spells a scripted text token
by token, then EOS (``finish_reason="stop"``), or stops with ``"length"`` at
``max_tokens``. It records every request and whether its stream was closed before it
sent its last event (an abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from lmserve_core.errors import BackendError, InvalidInput, ModelNotReady
from lmserve_core.generation.detokenizer import IncrementalDetokenizer
from lmserve_core.generation.params import GenerationRequest, TokenEvent, TokenLogprob
from lmserve_core.generation.prepare import (
    FrontendOptions,
    GenerationLimits,
    ModelFacts,
    Prepared,
    RequestHeaders,
    _content_format,
    chat_messages,
    prepare_chat,
    prepare_completion,
)
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest

BOS, EOS = 256, 257
VOCAB_SIZE = 258
SPECIALS = {BOS: "<s>", EOS: "</s>"}
TEMPLATE = "<|{role}|>{content}\n"
GEN_PROMPT = "<|assistant|>"
REPLACEMENT = "\ufffd"


# --- fakes ----------------------------------------------------------------------------


class FakeByteTokenizer:
    def __init__(self, chat_template: str | None = TEMPLATE) -> None:
        self._chat_template = chat_template
        self.template_calls: list[dict[str, Any]] = []

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if add_special_tokens and ids else ids

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(SPECIALS[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [SPECIALS.get(i) or f"<0x{i:02X}>" for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in SPECIALS

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template: str | None,
        extra: dict[str, Any] | None,
    ) -> str:
        self.template_calls.append({"messages": messages, "template": chat_template,
                                    "add_generation_prompt": add_generation_prompt,
                                    "extra": extra})  # fmt: skip
        assert chat_template is not None
        if "{raise}" in chat_template:
            raise ValueError("Conversation roles must alternate")
        text = "".join(chat_template.format(**m) for m in messages)
        return text + (GEN_PROMPT if add_generation_prompt else "")


Script = str | Callable[[GenerationRequest], str]


@dataclass
class Record:
    request: GenerationRequest
    yielded: int = 0  # events handed out
    final_sent: bool = False  # the event with finish_reason was handed out
    closed: bool = False  # the generator's finally ran

    @property
    def aborted(self) -> bool:
        return self.closed and not self.final_sent


@dataclass
class ScriptedBackend:
    tokenizer: FakeByteTokenizer
    script: Script = "Hello"
    max_model_len: int = 64
    vocab_size: int = VOCAB_SIZE
    is_encoder_decoder: bool = False
    # Raise this after that many events (callable: per request; None: never).
    fail_after: int | Callable[[GenerationRequest], int | None] | None = None
    failure: BaseException = field(default_factory=lambda: BackendError("the engine died"))
    # Block forever (until closed) after that many events.
    hang_after: int | None = None
    # End the sequence with this finish reason instead of EOS (e.g. "abort").
    final_reason: str | None = None
    records: list[Record] = field(default_factory=list)
    hanging: int = 0
    # Reported on the first event, as a backend with a prefix cache does.
    cached_tokens: int | None = None

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r.request for r in self.records]

    def record(self, request_id: str) -> Record:
        (rec,) = [r for r in self.records if r.request.request_id == request_id]
        return rec

    def text_for(self, request: GenerationRequest) -> str:
        return self.script(request) if callable(self.script) else self.script

    def _logprob(self, request: GenerationRequest, tid: int, i: int) -> TokenLogprob | None:
        k = request.params.logprobs
        if k is None:
            return None
        lp = -0.25 * (i + 1)
        alternatives = [(tid, lp), (ord("#"), lp - 1.0), (ord("~"), lp - 2.0), (ord("^"), lp - 3.0)]
        return TokenLogprob(tid, lp, tuple(alternatives[:k]))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rec = Record(request)
        self.records.append(rec)
        fail_after = self.fail_after(request) if callable(self.fail_after) else self.fail_after
        ids = list(self.text_for(request).encode("utf-8"))
        prompt_lps: tuple[TokenLogprob | None, ...] | None = None
        if request.params.prompt_logprobs is not None:
            prompt_lps = (
                None,
                *(
                    TokenLogprob(t, -1.5, ((t, -1.5), (ord("#"), -2.5)))
                    for t in request.prompt_ids[1:]
                ),
            )
        try:
            for i in range(len(ids) + 1):
                await asyncio.sleep(0)  # let the other choices run
                if fail_after is not None and rec.yielded == fail_after:
                    raise self.failure
                if self.hang_after is not None and rec.yielded == self.hang_after:
                    self.hanging += 1
                    await asyncio.Event().wait()
                first = prompt_lps if i == 0 else None
                if i == len(ids):
                    if self.final_reason is not None:
                        event = TokenEvent(None, finish_reason=self.final_reason)  # type: ignore[arg-type]
                    else:
                        lp = self._logprob(request, EOS, i)
                        event = TokenEvent(EOS, lp, "stop", True, first)
                elif ids[i] in request.params.stop_token_ids:  # as the engines report them
                    event = TokenEvent(
                        ids[i], self._logprob(request, ids[i], i), "stop", True, first,
                        stop_reason=ids[i],
                    )  # fmt: skip
                else:
                    last = i + 1 >= request.params.max_tokens
                    event = TokenEvent(
                        ids[i], self._logprob(request, ids[i], i), "length" if last else None,
                        False, first, cached_tokens=self.cached_tokens if i == 0 else None,
                    )  # fmt: skip
                rec.final_sent = event.finish_reason is not None
                rec.yielded += 1
                yield event
                if rec.final_sent:
                    return
        finally:
            rec.closed = True

    async def abort(self, request_id: str) -> None:
        pass

    def check_health(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class RecordingObserver:
    def __init__(self) -> None:
        self.first: list[float] = []
        self.inter: list[float] = []
        self.totals: list[tuple[int, int]] = []
        self.queued: list[float] = []

    def first_token(self, seconds: float, *, model: str | None = None) -> None:
        self.first.append(seconds)

    def queue_time(self, seconds: float, *, model: str | None = None) -> None:
        self.queued.append(seconds)

    def inter_token(self, seconds: float, *, model: str | None = None) -> None:
        self.inter.append(seconds)

    def tokens(self, prompt: int, generated: int, *, model: str | None = None) -> None:
        self.totals.append((prompt, generated))


def make(
    script: Script = "Hello",
    *,
    chat_template: str | None = TEMPLATE,
    trust: bool = False,
    default_sampling: dict[str, float] | None = None,
    limits: GenerationLimits | None = None,
    observer: RecordingObserver | None = None,
    options: FrontendOptions | None = None,
    **backend_kw: Any,
) -> tuple[OpenAIGenerationService, ScriptedBackend]:
    tok = FakeByteTokenizer(chat_template)
    backend = ScriptedBackend(tok, script, **backend_kw)
    facts = ModelFacts(backend.max_model_len, backend.vocab_size, backend.is_encoder_decoder,
                       default_sampling or {})  # fmt: skip
    service = OpenAIGenerationService(
        backend=backend, tokenizer=tok, facts=facts, limits=limits,
        trust_request_chat_template=trust, observer=observer, options=options,
    )  # fmt: skip
    return service, backend


def cmpl(**kw: Any) -> CompletionRequest:
    kw.setdefault("prompt", "Say")
    return CompletionRequest(model="m", **kw)


def chat(**kw: Any) -> ChatCompletionRequest:
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return ChatCompletionRequest(model="m", **kw)


def complete(service: OpenAIGenerationService, prep: Prepared) -> dict[str, Any]:
    """The response as its client reads it: the model's JSON, parsed."""
    body: dict[str, Any] = json.loads(asyncio.run(service.complete(prep)).model_dump_json())
    return body


def stream(service: OpenAIGenerationService, prep: Prepared) -> list[str]:
    """Each chunk's JSON, as the server puts it in a ``data:`` event."""

    async def collect() -> list[str]:
        return [chunk.model_dump_json() async for chunk in service.stream(prep)]

    return asyncio.run(collect())


def payloads(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


# --- prepare: validation --------------------------------------------------------------

TOK = FakeByteTokenizer()
FACTS = ModelFacts(max_model_len=64, vocab_size=VOCAB_SIZE, is_encoder_decoder=False)
LIMITS = GenerationLimits()


def prep_cmpl(req: CompletionRequest, facts: ModelFacts = FACTS) -> Prepared:
    return prepare_completion(req, TOK, facts, LIMITS)


def prep_chat(
    req: ChatCompletionRequest,
    tok: FakeByteTokenizer = TOK,
    *,
    facts: ModelFacts = FACTS,
    server_template: str | None = None,
    trust: bool = False,
) -> Prepared:
    """``server_template``: what --chat_template puts in the tokenizer (a fresh fake one)."""
    if server_template is not None:
        tok = FakeByteTokenizer(server_template)
    return prepare_chat(req, tok, facts, LIMITS, trust_request_template=trust)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"n": 17}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"suffix": "tail"}, "suffix"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"best_of": 2}, "best_of"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, 2, VOCAB_SIZE]}, "prompt"),
        ({"prompt": [[1, 2], [-1]]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"max_tokens": 61}, "max_tokens"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {str(VOCAB_SIZE): 1.0}}, "logit_bias"),
        ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"5": -101}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_prepare_completion_rejects(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as err:
        prep_cmpl(cmpl(**kw))
    assert err.value.param == param, err.value.message


def test_prepare_completion_limits_are_inclusive() -> None:
    # "Say" + BOS = 4 tokens: 60 more fit a context of 64 exactly.
    prep = prep_cmpl(cmpl(n=16, logprobs=20, max_tokens=60, stop=["x"] * 16, best_of=16))
    assert prep.n == 16 and prep.logprobs == 20 and prep.params.max_tokens == 60
    assert prep.params.logprobs == 20
    prep = prep_cmpl(cmpl(logit_bias={"0": -100, "257": 100}))
    assert prep.params.logit_bias == {0: -100.0, 257: 100.0}


def test_prepare_completion_context_message() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_cmpl(cmpl(max_tokens=100))
    assert "64" in err.value.message  # the context length
    assert "104" in err.value.message  # what was asked for in total
    # The longest prompt counts.
    with pytest.raises(InvalidInput) as err:
        prep_cmpl(cmpl(prompt=["a", "b" * 50], max_tokens=20))
    assert err.value.param == "max_tokens"


def test_prepare_completion_prompt_alone_too_long() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_cmpl(cmpl(prompt="x" * 80, max_tokens=None))
    assert err.value.param == "prompt"
    assert "64" in err.value.message


def test_prepare_completion_max_tokens_none_means_rest_of_context() -> None:
    assert prep_cmpl(cmpl(max_tokens=None)).params.max_tokens == 60
    assert prep_cmpl(cmpl()).params.max_tokens == 16  # the OpenAI default


def test_prepare_completion_prompt_forms() -> None:
    prep = prep_cmpl(cmpl(prompt="Hé"))
    assert [p.ids for p in prep.prompts] == [[BOS, 72, 0xC3, 0xA9]]
    assert prep.prompts[0].text == "Hé"
    prep = prep_cmpl(cmpl(prompt=["a", "bc"]))
    assert [p.ids for p in prep.prompts] == [[BOS, 97], [BOS, 98, 99]]
    prep = prep_cmpl(cmpl(prompt=[BOS, 104, 105]))
    assert [p.ids for p in prep.prompts] == [[BOS, 104, 105]]
    assert prep.prompts[0].text == "<s>hi"  # decoded with the specials, for echo
    prep = prep_cmpl(cmpl(prompt=[[104], [105, 106]]))
    assert [p.ids for p in prep.prompts] == [[104], [105, 106]]
    assert prep.kind == "completion" and prep.request_id.startswith("cmpl-")


def test_prepare_completion_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    assert prep_cmpl(cmpl(echo=True, logprobs=2)).params.prompt_logprobs == 2
    assert prep_cmpl(cmpl(echo=False, logprobs=2)).params.prompt_logprobs is None
    assert prep_cmpl(cmpl(echo=True)).params.prompt_logprobs is None


def test_prepare_completion_sampling_fields() -> None:
    prep = prep_cmpl(cmpl(
        temperature=0, top_p=0.5, top_k=-1, min_p=0.1, seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, stop_token_ids=[5], ignore_eos=True,
        stop="##", stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    p = prep.params
    assert p.greedy and p.temperature == 0.0
    assert (p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0, 0.1, 7)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.stop_token_ids == (5,) and p.ignore_eos
    assert prep.stops == ["##"] and prep.stream and prep.include_usage


def test_prepare_defaults_from_generation_config() -> None:
    facts = ModelFacts(64, VOCAB_SIZE, False, {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                               "repetition_penalty": 1.1})  # fmt: skip
    p = prep_cmpl(cmpl(), facts).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    # The request wins, including a falsy 0.
    p = prep_cmpl(cmpl(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0), facts).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    p = prep_chat(chat(), facts=facts).params
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.9, 20)
    # Without defaults: OpenAI's.
    p = prep_cmpl(cmpl()).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_choice_params_seed_per_choice() -> None:
    prep = prep_cmpl(cmpl(n=3, seed=100))
    assert [prep.choice_params(i).seed for i in range(3)] == [100, 101, 102]
    assert prep.choice_params(2).max_tokens == prep.params.max_tokens
    unseeded = prep_cmpl(cmpl(n=3))
    assert [unseeded.choice_params(i).seed for i in range(3)] == [None, None, None]


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"n": 17}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
         "messages[1].tool_call_id"),
        ({"messages": [{"role": "user", "content": "a"},
                       {"role": "tool", "content": "b", "tool_call_id": "nope"}]},
         "messages[1].tool_call_id"),
        ({"messages": [{"role": "user", "content": "a", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[0].tool_calls"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        ]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": None}]},
         "messages[1].content"),
        ({"tools": []}, "tools"),
        # "auto" (the default with tools) needs a tool-call parser, as in vLLM.
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"chat_template": "{content}"}, "chat_template"),
        ({"max_tokens": 100}, "max_tokens"),
        ({"max_completion_tokens": 100}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"logit_bias": {"1.5": 2}}, "logit_bias"),
        ({"logit_bias": {"3": 200}}, "logit_bias"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "x" * 80}]}, "messages"),
    ],
)  # fmt: skip
def test_prepare_chat_rejects(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(**kw))
    assert err.value.param == param, err.value.message


def test_prepare_chat_context_message_names_the_length() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(messages=[{"role": "user", "content": "x" * 80}]))
    assert "64" in err.value.message
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(max_completion_tokens=100))
    assert "maximum context length is 64" in err.value.message


def test_prepare_chat_max_tokens_default_is_the_rest_of_the_context() -> None:
    prep = prep_chat(chat())
    rendered = "<|user|>Hi\n<|assistant|>"
    assert prep.prompts[0].text == rendered
    assert prep.params.max_tokens == 64 - len(rendered.encode())
    # max_completion_tokens wins over max_tokens.
    assert prep_chat(chat(max_tokens=5, max_completion_tokens=3)).params.max_tokens == 3
    assert prep_chat(chat(max_tokens=5)).params.max_tokens == 5


def test_prepare_chat_no_double_bos_and_renders_messages() -> None:
    tok = FakeByteTokenizer()
    prep = prep_chat(chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None},
    ], chat_template_kwargs={"enable_thinking": False}), tok)  # fmt: skip
    (call,) = tok.template_calls
    assert call["messages"] == [
        {"role": "system", "content": "be brief"},  # developer → system
        {"role": "user", "content": "one\ntwo"},  # text parts joined
        {"role": "assistant", "content": ""},  # None allowed for the assistant
    ]
    assert call["add_generation_prompt"] is True
    assert call["extra"] == {"enable_thinking": False, "continue_final_message": False}
    assert prep.prompts[0].ids[0] != BOS  # encoded without special tokens
    assert prep.prompts[0].ids == list(prep.prompts[0].text.encode())
    assert prep.kind == "chat" and prep.request_id.startswith("chatcmpl-")
    assert prep.echo is False


def test_prepare_chat_add_generation_prompt_false() -> None:
    prep = prep_chat(chat(add_generation_prompt=False))
    assert prep.prompts[0].text == "<|user|>Hi\n"


def test_prepare_chat_template_choice() -> None:
    tok = FakeByteTokenizer()
    prep_chat(chat(), tok)
    assert tok.template_calls[-1]["template"] == TEMPLATE  # the tokenizer's
    prep = prep_chat(chat(), tok, server_template="[{role}] {content}|")  # --chat_template's
    assert prep.prompts[0].text == "[user] Hi|<|assistant|>"
    # A per-request template only when trusted, and then it wins over both.
    with pytest.raises(InvalidInput):
        prep_chat(chat(chat_template="R:{content};"), tok, server_template="x")
    prep = prep_chat(chat(chat_template="R:{content};"), tok, server_template="x", trust=True)
    assert prep.prompts[0].text == "R:Hi;<|assistant|>"


def test_prepare_chat_refused_template_message_names_the_flag() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(chat_template="{content}"))
    assert "--trust_request_chat_template" in err.value.message


def test_prepare_chat_without_any_template() -> None:
    tok = FakeByteTokenizer(chat_template=None)
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(), tok)
    assert err.value.param == "messages"
    assert "--chat_template" in err.value.message
    assert tok.template_calls == []
    # A server template makes it work.
    assert prep_chat(chat(), tok, server_template=TEMPLATE).prompts[0].text.startswith("<|user|>")


def test_prepare_chat_template_error_is_the_clients() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(), server_template="{raise}")
    assert err.value.param == "messages"
    assert "roles must alternate" in err.value.message


def test_prepare_chat_empty_rendering() -> None:
    with pytest.raises(InvalidInput) as err:
        prep_chat(chat(messages=[{"role": "user", "content": ""}], add_generation_prompt=False),
                  server_template="{content}")  # fmt: skip
    assert err.value.param == "messages"


def test_prepare_chat_logprobs() -> None:
    assert prep_chat(chat()).logprobs is None
    assert prep_chat(chat()).params.logprobs is None
    prep = prep_chat(chat(logprobs=True))
    assert prep.logprobs == 0 and prep.params.logprobs == 0
    prep = prep_chat(chat(logprobs=True, top_logprobs=20))
    assert prep.logprobs == 20 and prep.params.logprobs == 20
    assert prep.params.prompt_logprobs is None


def test_prepare_chat_allows_text_response_format_and_tool_choice_none() -> None:
    prep = prep_chat(chat(response_format={"type": "text"}, tool_choice="none"))
    assert prep.kind == "chat" and prep.params.structured is None and prep.parsing is None


def test_prepare_chat_stream_options() -> None:
    assert prep_chat(chat(stream=True, stream_options={"include_usage": True})).include_usage
    assert not prep_chat(chat(stream=True)).include_usage


def test_prepare_encoder_decoder_limits_only_the_input() -> None:
    facts = ModelFacts(max_model_len=8, vocab_size=VOCAB_SIZE, is_encoder_decoder=True)
    assert prep_cmpl(cmpl(prompt="abc", max_tokens=None), facts).params.max_tokens == 8
    assert prep_cmpl(cmpl(prompt="abcdefg", max_tokens=5), facts).params.max_tokens == 5
    with pytest.raises(InvalidInput) as err:
        prep_cmpl(cmpl(prompt="abcdefghij"), facts)
    assert err.value.param == "prompt"
    assert "8" in err.value.message


# --- service.complete() ---------------------------------------------------------------


def test_complete_text_and_eos() -> None:
    service, backend = make("Hello")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=20)))
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-") and out["model"] == "m"
    (choice,) = out["choices"]
    assert choice == {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop",
                      "stop_reason": None, "prompt_logprobs": None}  # fmt: skip
    # The EOS token is not text, but it was generated: it counts.
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    (rec,) = backend.records
    assert rec.request.prompt_ids == [BOS, 83, 97, 121]
    assert rec.request.params.max_tokens == 20
    assert rec.closed and not rec.aborted


def test_complete_stop_token_id_is_not_text() -> None:
    service, backend = make("line one\nline two")
    out = complete(service, service.prepare_completion(cmpl(stop_token_ids=[ord("\n")])))
    (choice,) = out["choices"]
    assert choice["text"] == "line one"
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len("line one\n")
    assert backend.requests[0].params.stop_token_ids == (ord("\n"),)


def test_complete_finish_without_a_token() -> None:
    # Some engines end with an event that carries no token.
    service, _ = make("done", final_reason="stop")
    out = complete(service, service.prepare_chat(chat()))
    (choice,) = out["choices"]
    assert choice["message"]["content"] == "done"
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 4


def test_complete_length() -> None:
    service, backend = make("Hello world")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=4)))
    (choice,) = out["choices"]
    assert choice["text"] == "Hell"
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4
    assert not backend.records[0].aborted


def test_complete_length_mid_character_flushes() -> None:
    service, _ = make("ab€")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=3)))
    (choice,) = out["choices"]
    # Cut inside "€": the tail is flushed as what the tokenizer makes of it.
    assert choice["text"] == "ab" + REPLACEMENT
    assert choice["finish_reason"] == "length"


def test_complete_stop_string_completed_by_the_final_flush() -> None:
    # The flushed tail (an incomplete "€" decodes as U+FFFD) can still hit a stop string.
    service, _ = make("ab€")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=3, stop=[REPLACEMENT])))
    (choice,) = out["choices"]
    assert choice["text"] == "ab"
    assert choice["finish_reason"] == "stop"


def test_complete_multibyte_text() -> None:
    text = "Grüße, 5€ 𝄞"
    service, _ = make(text)
    out = complete(service, service.prepare_chat(chat()))
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": text, "reasoning": None}
    assert out["usage"]["completion_tokens"] == len(text.encode()) + 1


def test_complete_stop_string_cuts_and_aborts() -> None:
    text = "Hello STOP and a very long tail that should never be generated"
    service, backend = make(text)
    out = complete(service, service.prepare_completion(cmpl(max_tokens=60, stop=["STOP"])))
    (choice,) = out["choices"]
    assert choice["text"] == "Hello "
    assert choice["finish_reason"] == "stop"
    (rec,) = backend.records
    assert rec.aborted  # the backend stream was closed before its end
    assert rec.yielded == len("Hello STOP")
    assert out["usage"]["completion_tokens"] == len("Hello STOP")


def test_complete_stop_string_held_prefix_released_at_eos() -> None:
    service, backend = make("the EN")
    out = complete(service, service.prepare_completion(cmpl(stop=["END"])))
    (choice,) = out["choices"]
    assert choice["text"] == "the EN"
    assert choice["finish_reason"] == "stop"  # by EOS
    assert not backend.records[0].aborted


def test_complete_stop_string_in_the_last_token() -> None:
    service, _ = make("abcXY")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=5, stop=["XY"])))
    (choice,) = out["choices"]
    assert choice["text"] == "abc"
    assert choice["finish_reason"] == "stop"  # the stop string, not "length"


def test_complete_chat() -> None:
    service, backend = make("Hi there")
    out = complete(service, service.prepare_chat(chat(max_tokens=30)))
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hi there",
                                              "reasoning": None},
                      "logprobs": None, "finish_reason": "stop", "stop_reason": None}  # fmt: skip
    prompt_len = len(b"<|user|>Hi\n<|assistant|>")
    assert out["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 9,
                            "total_tokens": prompt_len + 9}  # fmt: skip
    assert backend.requests[0].params.max_tokens == 30


def test_complete_n_choices_with_distinct_seeds() -> None:
    service, backend = make(lambda r: f"seed={r.params.seed}")
    out = complete(service, service.prepare_chat(chat(n=3, seed=7)))
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["choices"]] == ["seed=7", "seed=8", "seed=9"]
    assert sorted(r.params.seed for r in backend.requests) == [7, 8, 9]
    ids = {r.request_id for r in backend.requests}
    assert len(ids) == 3
    per_choice = len("seed=7") + 1
    assert out["usage"]["completion_tokens"] == 3 * per_choice
    # The prompt is counted once, not once per choice.
    assert out["usage"]["prompt_tokens"] == len(backend.requests[0].prompt_ids)


def test_complete_n_without_seed() -> None:
    service, backend = make("x")
    complete(service, service.prepare_completion(cmpl(n=2)))
    assert [r.params.seed for r in backend.requests] == [None, None]


def test_complete_multiple_prompts_index_is_prompt_times_n_plus_j() -> None:
    # The fake answers with the prompt reversed, so each choice shows its prompt.
    def script(r: GenerationRequest) -> str:
        return bytes(t for t in r.prompt_ids if t < 256).decode()[::-1]

    service, backend = make(script)
    out = complete(service, service.prepare_completion(cmpl(prompt=["ab", "cde"], n=2, seed=1)))
    got = [(c["index"], c["text"]) for c in out["choices"]]
    assert got == [(0, "ba"), (1, "ba"), (2, "edc"), (3, "edc")]
    by_id = {r.request_id.rsplit("-", 1)[1]: r for r in backend.requests}
    assert by_id["2"].prompt_ids == [BOS, 99, 100, 101]
    assert by_id["2"].params.seed == 1 and by_id["3"].params.seed == 2
    assert out["usage"]["prompt_tokens"] == 3 + 4
    assert out["usage"]["completion_tokens"] == 2 * 3 + 2 * 4


def test_complete_echo() -> None:
    service, _ = make("!")
    out = complete(service, service.prepare_completion(cmpl(prompt="Say", echo=True)))
    assert out["choices"][0]["text"] == "Say!"
    out = complete(service, service.prepare_completion(cmpl(prompt=["a", "b"], echo=True)))
    assert [c["text"] for c in out["choices"]] == ["a!", "b!"]


def test_complete_max_tokens_zero() -> None:
    service, backend = make("never")
    out = complete(service, service.prepare_completion(cmpl(max_tokens=0)))
    (choice,) = out["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    assert backend.records == []  # nothing generated, nothing asked
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    out = complete(service, service.prepare_completion(cmpl(max_tokens=0, echo=True)))
    assert out["choices"][0]["text"] == "Say"


def test_complete_completion_logprobs_format() -> None:
    service, backend = make("hé!")
    out = complete(service, service.prepare_completion(cmpl(logprobs=2)))
    assert backend.requests[0].params.logprobs == 2
    lp = out["choices"][0]["logprobs"]
    n = len("hé!".encode()) + 1  # EOS has an entry too (vLLM's), though no text
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["tokens"][0] == "h" and lp["tokens"][-2:] == ["!", "</s>"]
    assert out["choices"][0]["text"] == "hé!"
    assert lp["token_logprobs"] == [-0.25 * (i + 1) for i in range(n)]
    for token, value, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert top[token] == value  # the chosen token is among the alternatives
        assert all(v <= value for v in top.values())
    assert lp["top_logprobs"][0] == {"h": -0.25, "#": -1.25}
    offsets = lp["text_offset"]
    assert offsets[0] == 0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert offsets == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]


def test_complete_completion_logprobs_zero_keeps_the_chosen_token() -> None:
    service, _ = make("ab")
    out = complete(service, service.prepare_completion(cmpl(logprobs=0)))
    lp = out["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{"a": -0.25}, {"b": -0.5}, {"</s>": -0.75}]


def test_complete_completion_logprobs_with_echo() -> None:
    service, backend = make("ok")
    out = complete(service, service.prepare_completion(cmpl(prompt="Hi", echo=True, logprobs=1)))
    assert backend.requests[0].params.prompt_logprobs == 1
    choice = out["choices"][0]
    assert choice["text"] == "Hiok"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<s>", "H", "i", "o", "k", "</s>"]
    assert lp["token_logprobs"] == [None, -1.5, -1.5, -0.25, -0.5, -0.75]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"H": -1.5}  # k=1 of the prompt alternatives
    assert lp["top_logprobs"][3] == {"o": -0.25}
    assert lp["text_offset"] == [0, 3, 4, 5, 6, 7]
    # vLLM reports the echoed prompt's logprobs as prompt_logprobs too.
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == 3


def test_complete_chat_logprobs_format() -> None:
    service, backend = make("Hé")
    out = complete(service, service.prepare_chat(chat(logprobs=True, top_logprobs=3)))
    assert backend.requests[0].params.logprobs == 3
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == len("Hé".encode()) + 1  # and EOS
    assert content[-1]["token"] == "</s>"
    first = content[0]
    assert first["token"] == "H" and first["logprob"] == -0.25 and first["bytes"] == [72]
    assert [t["token"] for t in first["top_logprobs"]] == ["H", "#", "~"]
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.25, -1.25, -2.25]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}
            assert alt["bytes"] == list(alt["token"].encode())


def test_complete_chat_logprobs_without_top() -> None:
    service, _ = make("ab")
    out = complete(service, service.prepare_chat(chat(logprobs=True)))
    content = out["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["top_logprobs"]) for e in content] == [
        ("a", []), ("b", []), ("</s>", [])
    ]  # fmt: skip


def test_complete_backend_error_raises() -> None:
    service, backend = make("Hello", fail_after=2)
    with pytest.raises(BackendError, match="engine died"):
        complete(service, service.prepare_completion(cmpl()))
    assert backend.records[0].closed


def test_complete_one_failing_choice_closes_the_others() -> None:
    service, backend = make("a long answer", fail_after=lambda r: 2 if r.params.seed == 1 else None)
    with pytest.raises(BackendError):
        complete(service, service.prepare_completion(cmpl(n=3, seed=0)))
    assert len(backend.records) == 3
    assert all(r.closed for r in backend.records)
    assert sum(r.aborted for r in backend.records) == 3


def test_complete_observer() -> None:
    obs = RecordingObserver()
    service, _ = make("abc", observer=obs)
    complete(service, service.prepare_completion(cmpl(n=2)))
    assert len(obs.first) == 2  # one time-to-first-token per choice
    assert len(obs.inter) == 2 * 3  # "abc" + EOS: 3 gaps per choice
    assert obs.totals == [(4, 8)]


# --- service.stream() -----------------------------------------------------------------


def chat_choices(chunks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            by_index.setdefault(c["index"], []).append(c)
    return by_index


def check_chat_stream(chunks: list[dict[str, Any]], n: int) -> dict[int, str]:
    """docs/behaviour.md §5 chunk rules; returns each choice's streamed content."""
    by_index = chat_choices(chunks)
    assert sorted(by_index) == list(range(n))
    texts = {}
    for index, items in by_index.items():
        assert items[0]["delta"] == {"role": "assistant", "content": ""}
        assert items[0]["finish_reason"] is None
        for item in items[1:]:
            assert "role" not in item["delta"]
        assert [i["finish_reason"] is not None for i in items] == [False] * (len(items) - 1) + [
            True
        ]
        texts[index] = "".join(i["delta"].get("content", "") for i in items)
    return texts


def test_stream_chat_chunks() -> None:
    service, _ = make("Hi there")
    prep = service.prepare_chat(chat(stream=True))
    chunks = payloads(stream(service, prep))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert {c["id"] for c in chunks} == {prep.request_id}
    assert {c["created"] for c in chunks} == {prep.created}
    assert all("usage" not in c for c in chunks)
    texts = check_chat_stream(chunks, 1)
    assert texts == {0: "Hi there"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # Content arrives incrementally, not in one piece.
    assert len(chunks) > 3


def test_stream_chat_equals_complete() -> None:
    text = "Ünïcödé text, 5€ and 𝄞 with STOP after"
    for kw in ({}, {"stop": ["STOP"]}, {"max_tokens": 12}, {"n": 2, "seed": 3}):
        service, _ = make(text)
        full = complete(service, service.prepare_chat(chat(**kw)))
        streamed = payloads(stream(service, service.prepare_chat(chat(stream=True, **kw))))
        texts = check_chat_stream(streamed, len(full["choices"]))
        finishes = {c["index"]: c["finish_reason"] for ch in streamed for c in ch["choices"]
                    if c["finish_reason"]}  # fmt: skip
        for choice in full["choices"]:
            assert texts[choice["index"]] == choice["message"]["content"], kw
            assert finishes[choice["index"]] == choice["finish_reason"], kw


def test_stream_chat_n_choices_and_usage() -> None:
    service, _ = make("abc")
    prep = service.prepare_chat(chat(n=3, stream=True, stream_options={"include_usage": True}))
    chunks = payloads(stream(service, prep))
    # The role chunks come first, one per choice.
    assert [c["choices"][0]["index"] for c in chunks[:3]] == [0, 1, 2]
    *body, last = chunks
    assert last["choices"] == []
    prompt_len = len(prep.prompts[0].ids)
    assert last["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 12,
                             "total_tokens": prompt_len + 12}  # fmt: skip
    assert last["object"] == "chat.completion.chunk" and last["id"] == prep.request_id
    assert check_chat_stream(body, 3) == {0: "abc", 1: "abc", 2: "abc"}
    assert all(len(c["choices"]) == 1 for c in body)


def test_stream_chat_stop_string_never_streamed() -> None:
    service, backend = make("one two END three four five six seven")
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True, stop=["END"]))))
    texts = check_chat_stream(chunks, 1)
    assert texts[0] == "one two "
    assert all("E" not in c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert backend.records[0].aborted


def test_stream_never_splits_multibyte_characters() -> None:
    text = "€é𝄞日本"
    service, _ = make(text)
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True))))
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert all(REPLACEMENT not in p for p in pieces)
    assert [p for p in pieces if p] == list(text)  # one whole character per chunk here
    service, _ = make(text)
    chunks = payloads(stream(service, service.prepare_completion(cmpl(stream=True))))
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_chat_logprobs_per_chunk() -> None:
    service, _ = make("ab")
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True, logprobs=True,
                                                                 top_logprobs=1))))  # fmt: skip
    entries = [e for c in chunks if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert [(e["token"], e["logprob"]) for e in entries] == [
        ("a", -0.25), ("b", -0.5), ("</s>", -0.75)
    ]  # fmt: skip
    assert entries[0]["top_logprobs"] == [{"token": "a", "logprob": -0.25, "bytes": [97]}]


def test_stream_completion_chunks_and_echo() -> None:
    service, _ = make("xyz")
    prep = service.prepare_completion(cmpl(prompt=["p", "q"], n=2, echo=True, stream=True,
                                           stream_options={"include_usage": True}))  # fmt: skip
    chunks = payloads(stream(service, prep))
    *body, last = chunks
    assert all(c["object"] == "text_completion" for c in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4 * 4
    by_index = chat_choices(body)
    assert sorted(by_index) == [0, 1, 2, 3]
    for index, items in by_index.items():
        prompt = "p" if index < 2 else "q"
        assert items[0]["text"].startswith(prompt)  # the echo comes first, once
        assert "".join(i["text"] for i in items) == prompt + "xyz"
        assert [i["finish_reason"] for i in items][-1] == "stop"
        assert all(i["finish_reason"] is None for i in items[:-1])


def test_stream_completion_equals_complete() -> None:
    for kw in ({"max_tokens": 5}, {"stop": ["l"]}, {"logprobs": 1}, {"n": 2}):
        service, _ = make("hello wörld")
        full = complete(service, service.prepare_completion(cmpl(**kw)))
        chunks = payloads(stream(service, service.prepare_completion(cmpl(stream=True, **kw))))
        by_index = chat_choices(chunks)
        for choice in full["choices"]:
            items = by_index[choice["index"]]
            assert "".join(i["text"] for i in items) == choice["text"], kw
            assert items[-1]["finish_reason"] == choice["finish_reason"], kw
            if choice["logprobs"]:
                tokens = [t for i in items if i["logprobs"] for t in i["logprobs"]["tokens"]]
                assert tokens == choice["logprobs"]["tokens"]


def test_stream_max_tokens_zero() -> None:
    service, backend = make("never")
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True, max_tokens=0))))
    assert check_chat_stream(chunks, 1) == {0: ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert backend.records == []


def stream_until_error(
    service: OpenAIGenerationService, prep: Prepared
) -> tuple[list[dict[str, Any]], BaseException]:
    """The payloads a stream yielded before it raised, and what it raised."""
    received: list[str] = []

    async def collect() -> BaseException:
        try:
            async for chunk in service.stream(prep):
                received.append(chunk.model_dump_json())
        except Exception as exc:  # the server maps it (lmserve_server.errors)
            return exc
        raise AssertionError(f"the stream ended without an error: {received}")

    error = asyncio.run(collect())
    return [json.loads(line) for line in received], error


def test_stream_backend_error_propagates_after_what_was_streamed() -> None:
    service, backend = make("Hello world", fail_after=3)
    chunks, error = stream_until_error(service, service.prepare_chat(chat(stream=True)))
    assert isinstance(error, BackendError) and error.message == "the engine died"
    # What was generated before the failure was streamed, without a finish_reason.
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hel"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert backend.records[0].closed


def test_stream_unexpected_error_propagates_as_it_is() -> None:
    service, _ = make("Hello", fail_after=1, failure=RuntimeError("secret detail"))
    _, error = stream_until_error(service, service.prepare_completion(cmpl(stream=True)))
    assert isinstance(error, RuntimeError)


def test_stream_backend_abort_is_model_not_ready() -> None:
    service, _ = make("Hi", final_reason="abort")
    _, error = stream_until_error(service, service.prepare_chat(chat(stream=True)))
    assert isinstance(error, ModelNotReady)


def test_stream_missing_finish_reason_is_a_backend_error() -> None:
    class Truncated(ScriptedBackend):
        async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
            yield TokenEvent(ord("a"))

    tok = FakeByteTokenizer()
    backend = Truncated(tok)
    service = OpenAIGenerationService(backend=backend, tokenizer=tok, facts=FACTS)
    _, error = stream_until_error(service, service.prepare_chat(chat(stream=True)))
    assert isinstance(error, BackendError) and "without a finish reason" in error.message


def test_stream_cancelled_consumer_aborts_every_choice() -> None:
    service, backend = make("a long answer that never ends", hang_after=2)
    prep = service.prepare_chat(chat(n=3, stream=True))
    received: list[object] = []

    async def main() -> None:
        async def consume() -> None:
            async for chunk in service.stream(prep):
                received.append(chunk)

        task = asyncio.create_task(consume())
        for _ in range(1000):
            if backend.hanging == 3:
                break
            await asyncio.sleep(0)
        assert backend.hanging == 3
        assert not any(r.closed for r in backend.records)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Closed by the time the consumer is gone, not later at loop shutdown.
        assert len(backend.records) == 3
        assert all(r.aborted for r in backend.records)

    asyncio.run(main())
    assert len(received) >= 3  # the role chunks at least


def test_stream_closed_early_by_the_consumer_aborts() -> None:
    service, backend = make("a long answer that never ends", hang_after=5)
    prep = service.prepare_completion(cmpl(n=2, stream=True))

    async def main() -> None:
        async with contextlib.aclosing(service.stream(prep)) as lines:
            async for _ in lines:
                break
        assert all(r.aborted for r in backend.records)
        assert len(backend.records) == 2

    asyncio.run(main())


# --- vLLM's request fields: implemented with vLLM's meaning, or refused -------------------


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("completion", "use_beam_search", True),
        ("chat", "use_beam_search", True),
        ("chat", "length_penalty", 0.5),
        ("chat", "bad_words", ["x"]),
        ("completion", "prompt_embeds", "AAAA"),
    ],
)
def test_an_unimplemented_vllm_field_is_a_400_naming_it(kind: str, field: str, value: Any) -> None:
    service, backend = make()
    body: dict[str, Any] = {"model": "m", field: value}
    with pytest.raises(InvalidInput) as err:
        if kind == "chat":
            service.prepare_chat(
                ChatCompletionRequest.model_validate(
                    {**body, "messages": [{"role": "user", "content": "Hi"}]}
                )
            )
        else:
            service.prepare_completion(CompletionRequest.model_validate({**body, "prompt": "Say"}))
    assert err.value.param == field and "not supported" in err.value.message
    assert backend.records == []


def test_vllm_defaults_and_fields_of_no_api_are_accepted() -> None:
    service, _ = make()
    defaults = {"use_beam_search": False, "length_penalty": 1, "bad_words": [], "priority": 0,
                "response_format": {"type": "text"}, "made_up_field": 7}  # fmt: skip
    out = complete(service, service.prepare_completion(CompletionRequest.model_validate(
        {"model": "m", "prompt": "Say", **defaults})))  # fmt: skip
    assert out["choices"][0]["text"] == "Hello"


def test_the_response_id_is_the_header_then_request_id_then_random() -> None:
    service, _ = make()
    assert (
        service.prepare_chat(
            chat(request_id="abc"), headers=RequestHeaders(request_id="hdr")
        ).request_id
        == "chatcmpl-hdr"
    )
    assert service.prepare_chat(chat(request_id="abc")).request_id == "chatcmpl-abc"
    assert service.prepare_completion(cmpl(request_id="abc")).request_id == "cmpl-abc"
    first, second = (service.prepare_completion(cmpl()).request_id for _ in range(2))
    assert first.startswith("cmpl-") and first != second


@pytest.mark.parametrize(
    ("keep", "side", "expected"),
    [
        (2, None, [97, 121]),  # vLLM's default for generation: keep the last tokens
        (2, "right", [BOS, 83]),
        (-1, "left", None),  # the context less one: nothing to cut here
        (10, "right", None),
    ],
)
def test_truncate_prompt_tokens(keep: int, side: str | None, expected: list[int] | None) -> None:
    service, _ = make()
    prep = service.prepare_completion(cmpl(truncate_prompt_tokens=keep, truncation_side=side))
    full = [BOS, 83, 97, 121]
    assert prep.prompts[0].ids == (expected or full)
    assert prep.prompts[0].text == (
        "Say" if expected is None else TOK.decode(expected, skip_special_tokens=False)
    )


def test_truncate_prompt_tokens_beyond_the_context_is_a_400() -> None:
    service, _ = make()
    with pytest.raises(InvalidInput) as err:
        service.prepare_completion(cmpl(truncate_prompt_tokens=65))
    assert err.value.param == "truncate_prompt_tokens"


def test_truncation_to_minus_one_keeps_the_context_less_one() -> None:
    service, _ = make(max_model_len=8)
    prep = service.prepare_completion(cmpl(prompt="abcdefghijkl", truncate_prompt_tokens=-1,
                                           truncation_side="left", max_tokens=1))  # fmt: skip
    assert prep.prompts[0].ids == list(b"fghijkl")


def test_add_special_tokens_on_completions_and_chat() -> None:
    service, _ = make()
    assert service.prepare_completion(cmpl(add_special_tokens=False)).prompts[0].ids == list(b"Say")
    assert service.prepare_chat(chat()).prompts[0].ids[0] != BOS  # the template's own BOS only
    assert service.prepare_chat(chat(add_special_tokens=True)).prompts[0].ids[0] == BOS


def test_continue_final_message_and_template_fields_reach_the_template() -> None:
    service, _ = make()
    tok = service.tokenizer
    assert isinstance(tok, FakeByteTokenizer)
    docs = [{"title": "t", "text": "x"}]
    service.prepare_chat(chat(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
        add_generation_prompt=False, continue_final_message=True, documents=docs,
        reasoning_effort="low", chat_template_kwargs={"custom": 1},
    ))  # fmt: skip
    assert tok.template_calls[-1]["extra"] == {"custom": 1, "continue_final_message": True,
                                               "documents": docs, "reasoning_effort": "low",
                                               "enable_thinking": True}  # fmt: skip
    with pytest.raises(InvalidInput) as err:
        service.prepare_chat(chat(continue_final_message=True))
    assert err.value.param == "continue_final_message"


def test_chat_echo_repeats_the_final_assistant_message() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}]
    service, _ = make("Hello")
    body = {"messages": messages, "echo": True, "add_generation_prompt": False}
    out = complete(service, service.prepare_chat(chat(**body)))
    assert out["choices"][0]["message"]["content"] == "Well, Hello"
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True, **body))))
    assert chunks[1]["choices"][0]["delta"] == {"content": "Well, "}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Well, Hello"
    # The last message is the user's: nothing to echo.
    plain = complete(service, service.prepare_chat(chat(echo=True)))
    assert plain["choices"][0]["message"]["content"] == "Hello"


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk() -> None:
    service, _ = make("abc")
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = payloads(
        stream(service, service.prepare_chat(chat(stream=True, stream_options=options)))
    )
    prompt_len = len(b"<|user|>Hi\n<|assistant|>")
    *per_choice, last = chunks
    assert all(c["usage"]["prompt_tokens"] == prompt_len for c in per_choice)
    assert [c["usage"]["completion_tokens"] for c in per_choice] == [0, 1, 2, 3, 4]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    plain = payloads(stream(service, service.prepare_chat(chat(stream=True))))
    assert all("usage" not in c for c in plain)


def test_stop_reason_names_the_stop_string_or_token() -> None:
    service, _ = make("Hello world")
    by_string = complete(service, service.prepare_completion(cmpl(stop=["wor"])))
    assert by_string["choices"][0]["stop_reason"] == "wor"
    by_token = complete(service, service.prepare_completion(cmpl(stop_token_ids=[ord(" ")])))
    assert by_token["choices"][0]["stop_reason"] == ord(" ")
    assert by_token["choices"][0]["text"] == "Hello"
    by_eos = complete(service, service.prepare_chat(chat()))
    assert by_eos["choices"][0]["stop_reason"] is None
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True, stop=["wor"]))))
    assert chunks[-1]["choices"][0]["stop_reason"] == "wor"


def test_include_stop_str_in_output_keeps_the_stop_string_and_token() -> None:
    service, _ = make("Hello world")
    out = complete(service, service.prepare_completion(
        cmpl(stop=["wor"], include_stop_str_in_output=True)))  # fmt: skip
    assert out["choices"][0]["text"] == "Hello wor"
    out = complete(service, service.prepare_completion(
        cmpl(stop_token_ids=[ord(" ")], include_stop_str_in_output=True)))  # fmt: skip
    assert out["choices"][0]["text"] == "Hello "


def test_stop_strings_count_only_after_min_tokens() -> None:
    service, backend = make("ab ab ab")
    out = complete(service, service.prepare_completion(cmpl(stop=["ab"], min_tokens=3)))
    # "ab " passes through before the 4th token; the next "ab" stops it.
    assert out["choices"][0]["text"] == "ab " and out["choices"][0]["stop_reason"] == "ab"
    assert backend.requests[-1].params.min_tokens == 3


def test_min_tokens_is_capped_by_max_tokens() -> None:
    service, _ = make()
    assert service.prepare_completion(cmpl(min_tokens=50, max_tokens=4)).params.min_tokens == 4


@pytest.mark.parametrize(("skip", "text"), [(True, "ab"), (False, "a<s>b")])
def test_skip_special_tokens_decides_whether_special_tokens_are_text(skip: bool, text: str) -> None:
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    assert "".join(detok.add(t) for t in (ord("a"), BOS, ord("b"))) + detok.flush() == text


def test_skip_special_tokens_reaches_the_detokenizer() -> None:
    prep = make()[0].prepare_chat(
        chat(skip_special_tokens=False, spaces_between_special_tokens=False)
    )
    assert prep.text.skip_special_tokens is False
    assert prep.text.spaces_between_special_tokens is False


def test_max_logprobs_limit_and_no_limit() -> None:
    service, _ = make(limits=GenerationLimits(max_logprobs=2))
    with pytest.raises(InvalidInput) as err:
        service.prepare_completion(cmpl(logprobs=3))
    assert err.value.param == "logprobs" and "at most 2" in err.value.message
    unlimited, _ = make(limits=GenerationLimits(max_logprobs=-1))
    assert unlimited.prepare_chat(chat(logprobs=True, top_logprobs=100)).logprobs == 100
    with pytest.raises(InvalidInput):
        unlimited.prepare_chat(chat(logprobs=True, top_logprobs=VOCAB_SIZE + 1))


def test_tool_history_and_names_reach_the_template() -> None:
    service, _ = make()
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]  # fmt: skip
    service.prepare_chat(chat(messages=history))
    tok = service.tokenizer
    assert isinstance(tok, FakeByteTokenizer)
    # Arguments reach templates as objects (vLLM's rule), the result with its call's id.
    assert tok.template_calls[-1]["messages"][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    service.prepare_chat(chat(messages=[{"role": "user", "content": "Hi", "name": "ann"}]))
    tok = service.tokenizer
    assert isinstance(tok, FakeByteTokenizer)
    assert tok.template_calls[-1]["messages"] == [{"role": "user", "content": "Hi", "name": "ann"}]


def test_priority_needs_priority_scheduling_and_the_header_wins() -> None:
    fcfs, _ = make()
    with pytest.raises(InvalidInput) as err:
        fcfs.prepare_chat(chat(priority=3))
    assert err.value.param == "priority" and "--scheduling_policy priority" in err.value.message
    assert fcfs.prepare_chat(chat(priority=0)).priority == 0
    service, backend = make(limits=GenerationLimits(priority_scheduling=True))
    assert service.prepare_chat(chat(priority=3)).priority == 3
    header = RequestHeaders(priority="-2")
    assert service.prepare_chat(chat(priority=3), headers=header).priority == -2
    not_a_number = RequestHeaders(priority="high")
    assert service.prepare_chat(chat(priority=3), headers=not_a_number).priority == 3
    complete(service, service.prepare_completion(cmpl(priority=5)))
    assert backend.requests[-1].priority == 5


def test_prompt_logprobs_per_prompt_token_with_rank() -> None:
    service, backend = make("ok")
    out = complete(service, service.prepare_completion(cmpl(prompt_logprobs=1)))
    assert backend.requests[-1].params.prompt_logprobs == 1
    entries = out["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len([BOS, *b"Say"])
    # Each later position: the prompt token (the fake's rank: none) and the top-1 candidate.
    assert entries[1] == {str(ord("S")): {"logprob": -1.5, "rank": 1, "decoded_token": "S"}}
    chat_out = complete(service, service.prepare_chat(chat(prompt_logprobs=2)))
    assert chat_out["prompt_logprobs"][0] is None
    assert set(chat_out["prompt_logprobs"][1]) == {str(ord("|")), str(ord("#"))}
    assert complete(service, service.prepare_chat(chat()))["prompt_logprobs"] is None


def test_prompt_logprobs_limits() -> None:
    service, _ = make()
    with pytest.raises(InvalidInput) as err:
        service.prepare_completion(cmpl(prompt_logprobs=1, stream=True))
    assert err.value.param == "prompt_logprobs"
    with pytest.raises(InvalidInput) as err:
        service.prepare_completion(cmpl(prompt_logprobs=-1))  # the vocabulary, over 20
    assert "at most 20" in err.value.message
    assert service.prepare_completion(cmpl(prompt_logprobs=0, stream=True)).prompt_logprobs == 0


# --- vLLM's OpenAI server flags --------------------------------------------------------------


def test_response_role_names_the_message_and_the_echo() -> None:
    service, _ = make(options=FrontendOptions(response_role="bot"))
    out = complete(service, service.prepare_chat(chat()))
    assert out["choices"][0]["message"]["role"] == "bot"
    chunks = payloads(stream(service, service.prepare_chat(chat(stream=True))))
    assert chunks[0]["choices"][0]["delta"] == {"role": "bot", "content": ""}
    history = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "So, "}]
    with pytest.raises(InvalidInput):  # "bot" is not a role a message may have
        service.prepare_chat(chat(messages=history, echo=True, add_generation_prompt=False))


def test_force_include_usage_ends_every_stream_with_usage() -> None:
    service, _ = make(options=FrontendOptions(force_include_usage=True))
    chunks = payloads(stream(service, service.prepare_completion(cmpl(stream=True))))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all("usage" not in c for c in chunks[:-1])


def test_tokens_as_token_ids_from_the_server_or_the_request() -> None:
    service, _ = make("ab", options=FrontendOptions(tokens_as_ids=True))
    out = complete(service, service.prepare_chat(chat(logprobs=True, top_logprobs=1)))
    first = out["choices"][0]["logprobs"]["content"][0]
    # vLLM: the chosen token's bytes stay its text's; an alternative's are its name's.
    assert first["token"] == f"token_id:{ord('a')}" and first["bytes"] == list(b"a")
    assert first["top_logprobs"][0] == {"token": "token_id:97", "logprob": -0.25,
                                        "bytes": list(b"token_id:97")}  # fmt: skip
    text = complete(
        service, service.prepare_completion(cmpl(logprobs=1, return_tokens_as_token_ids=False))
    )
    assert text["choices"][0]["logprobs"]["tokens"][:2] == ["a", "b"]
    plain, _ = make("ab")
    on_request = complete(
        plain, plain.prepare_completion(cmpl(logprobs=1, return_tokens_as_token_ids=True))
    )
    assert on_request["choices"][0]["logprobs"]["tokens"][0] == "token_id:97"


@pytest.mark.parametrize(
    ("option", "template", "expected"),
    [
        ("string", TEMPLATE, "Hi\nthere"),
        ("openai", TEMPLATE, [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]),
        ("auto", "{% for m in messages %}{{ m['content'] }}{% endfor %}", "Hi\nthere"),
        (
            "auto",
            "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
            [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        ),
        (
            "auto",
            "{% for m in messages %}{% for p in m.content %}{% endfor %}{% endfor %}",
            [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
        ),
    ],
)
def test_chat_template_content_format(option: str, template: str, expected: Any) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    fmt = _content_format(option, template)
    messages = chat_messages(chat(messages=[{"role": "user", "content": parts}]), fmt)
    assert messages[0]["content"] == expected


def test_the_content_format_reaches_the_template() -> None:
    service, _ = make(options=FrontendOptions(content_format="openai"))
    service.prepare_chat(chat())
    tok = service.tokenizer
    assert isinstance(tok, FakeByteTokenizer)
    assert tok.template_calls[-1]["messages"][0]["content"] == [{"type": "text", "text": "Hi"}]


def test_prompt_tokens_details_report_cached_prompt_tokens() -> None:
    service, _ = make(options=FrontendOptions(prompt_tokens_details=True), cached_tokens=3)
    out = complete(service, service.prepare_completion(cmpl(n=2, prompt=["Say", "Tell"])))
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 6}  # one per prompt
    chunks = payloads(
        stream(
            service, service.prepare_chat(chat(stream=True, stream_options={"include_usage": True}))
        )
    )
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    none_cached, _ = make(options=FrontendOptions(prompt_tokens_details=True), cached_tokens=0)
    assert (
        "prompt_tokens_details"
        not in complete(none_cached, none_cached.prepare_completion(cmpl()))["usage"]
    )
    off, _ = make(cached_tokens=3)
    assert "prompt_tokens_details" not in complete(off, off.prepare_completion(cmpl()))["usage"]
