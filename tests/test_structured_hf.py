"""Structured outputs (constrained decoding) on the transformers engine, with xgrammar.

The tiny llama runs in the real engine (continuous batching, sampling, logprobs) with every
kind of constraint. The model's answers are not asserted (the tiny model is only trained for
the behaviours in ``_support/tiny_model_checks.py``): every spec here has only finite
sentences that fit in ``max_tokens``, so whatever the weights, the output must match the spec
and end with finish_reason "stop". The unconstrained rows beside them are checked against the
trained behaviours (``CHAT_ANSWERS``, ``STORY_CONTINUATION``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from _support.tiny_model_checks import CHAT_ANSWERS, STORY_CONTINUATION, STORY_PROMPT, STORY_TOKENS
from _support.tiny_models import model_path
from lmserve_backend_hf import create_backend
from lmserve_core.backend import LoadRequest
from lmserve_core.errors import BackendError, InvalidInput
from lmserve_core.generation.params import (
    GenerationRequest,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
)
from lmserve_core.model_files import ModelSource, read_model_config
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

pytestmark = pytest.mark.slow

# Every sentence of these is at most ~100 characters (each token is at least one byte).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["name", "ok", "n", "color"],
}
SMALL = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["x"]}  # fmt: skip
EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
CHOICES = ["yes", "no", "maybe so", 'a "quoted"\nline']
LIST_GRAMMAR = 'root ::= item ("," item){0,3}\nitem ::= [0-9] [0-9]?'
MAX_TOKENS = 160
SAMPLED = [
    {"temperature": 1.0, "seed": 0},
    {"temperature": 1.3, "seed": 1, "top_k": 20},
    {"temperature": 0.8, "seed": 2, "top_p": 0.9, "min_p": 0.05},
]


def _json(schema: dict[str, Any], **flags: Any) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema), **flags)


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema comes with the dev environment
        assert isinstance(instance, dict) and set(instance) == set(schema["required"])
        return
    jsonschema.validate(instance, schema)


class Runner:
    """The HF engine of the tiny llama, started on an event loop of its own."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        path = model_path("llama")
        request = LoadRequest(ServeSettings(torch_threads=1), ModelSource(path, str(path)),
                              Task.text_generation, read_model_config(path))  # fmt: skip
        self.engine: Any = create_backend(request).backend
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())
        self._ids = 0

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()

    def chat(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def raw(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def text(self, events: list[TokenEvent]) -> str:
        ids = [e.token_id for e in events if e.token_id is not None and not e.is_stop_token]
        return str(self.tokenizer.decode(ids))

    async def _events(self, prompt: list[int], params: SamplingParams) -> list[TokenEvent]:
        self._ids += 1
        request = GenerationRequest(f"s{self._ids}", prompt, params)
        return [e async for e in self.engine.generate(request)]

    def run(self, *jobs: tuple[list[int], SamplingParams]) -> list[list[TokenEvent]]:
        """All ``jobs`` at once (they share the engine's batches); their events."""

        async def together() -> list[list[TokenEvent]]:
            return list(await asyncio.gather(*(self._events(p, s) for p, s in jobs)))

        return self.loop.run_until_complete(together())

    def one(self, prompt: list[int], **params: Any) -> tuple[str, list[TokenEvent]]:
        params.setdefault("max_tokens", MAX_TOKENS)
        params.setdefault("temperature", 0.0)
        (events,) = self.run((prompt, SamplingParams(**params)))
        return self.text(events), events


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


def _stopped(events: list[TokenEvent]) -> None:
    last = events[-1]
    assert last.finish_reason == "stop", [e.token_id for e in events]
    assert last.is_stop_token  # the grammar ended on EOS or a stop token, left out of the text


# --- each kind, greedy and sampled -------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{}, *SAMPLED], ids=["greedy", "t1", "topk", "topp"])
def test_json_schema(runner: Runner, sampling: dict[str, Any]) -> None:
    spec = _json(PERSON, disable_any_whitespace=True)
    text, events = runner.one(runner.chat("Give me a JSON object."), structured=spec, **sampling)
    _stopped(events)
    _validate(json.loads(text), PERSON)
    assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text))  # none outside strings


@pytest.mark.parametrize("sampling", [{}, SAMPLED[0]], ids=["greedy", "sampled"])
def test_json_schema_with_whitespace(runner: Runner, sampling: dict[str, Any]) -> None:
    """Any whitespace is allowed (vLLM's default): the output may not end in ``max_tokens``
    with a tiny model, but what there is must be a prefix of a valid instance."""
    spec = _json(SMALL)
    text, events = runner.one(runner.raw("the capital of france is"), structured=spec,
                              max_tokens=40, **sampling)  # fmt: skip
    if events[-1].finish_reason == "stop":
        _validate(json.loads(text), SMALL)
    else:
        assert events[-1].finish_reason == "length"
        assert text.lstrip().startswith("{")


def test_json_object(runner: Runner) -> None:
    # Any object; the bias on "{" and "}" closes it at once whatever the model prefers (the
    # mask and logit_bias together: each is only ever sampled where the grammar allows it).
    close = {t: 100.0 for t, s in _vocab(runner).items() if s in ("{", "}", "{}")}
    spec = StructuredOutput("json_object", disable_any_whitespace=True)
    text, events = runner.one(runner.chat("JSON please."), structured=spec, logit_bias=close)
    _stopped(events)
    assert json.loads(text) == {}
    text, events = runner.one(runner.chat("JSON please."), structured=spec, max_tokens=64,
                              temperature=1.0, seed=3)  # fmt: skip
    if events[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize("sampling", [{}, *SAMPLED], ids=["greedy", "t1", "topk", "topp"])
def test_regex(runner: Runner, sampling: dict[str, Any]) -> None:
    spec = StructuredOutput("regex", EMAIL)
    text, events = runner.one(runner.chat("Your email?"), structured=spec, **sampling)
    _stopped(events)
    assert re.fullmatch(EMAIL, text), text


@pytest.mark.parametrize("sampling", [{}, *SAMPLED], ids=["greedy", "t1", "topk", "topp"])
def test_choice(runner: Runner, sampling: dict[str, Any]) -> None:
    spec = StructuredOutput("choice", json.dumps(CHOICES))
    text, events = runner.one(runner.chat("Yes or no?"), structured=spec, **sampling)
    _stopped(events)
    assert text in CHOICES


@pytest.mark.parametrize(
    "grammar,pattern",
    [
        ('root ::= "yes" | "no"', "yes|no"),
        (LIST_GRAMMAR, r"[0-9]{1,2}(,[0-9]{1,2}){0,3}"),
        ('start: "yes" | "no"', "yes|no"),  # Lark
        ('start: NUM ("-" NUM)?\nNUM: /[0-9]{1,3}/', r"[0-9]{1,3}(-[0-9]{1,3})?"),  # Lark
    ],
    ids=["ebnf-choice", "ebnf-list", "lark-choice", "lark-terminals"],
)
@pytest.mark.parametrize("sampling", [{}, SAMPLED[0]], ids=["greedy", "sampled"])
def test_grammar(runner: Runner, grammar: str, pattern: str, sampling: dict[str, Any]) -> None:
    spec = StructuredOutput("grammar", grammar)
    text, events = runner.one(runner.chat("Numbers?"), structured=spec, **sampling)
    _stopped(events)
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("sampling", [{}, SAMPLED[0]], ids=["greedy", "sampled"])
def test_structural_tag_forced(runner: Runner, sampling: dict[str, Any]) -> None:
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>", "end": "</a>",
           "content": {"type": "json_schema", "json_schema": SMALL, "max_whitespace_cnt": 1}}}  # fmt: skip
    spec = StructuredOutput("structural_tag", json.dumps(tag))
    text, events = runner.one(runner.chat("Tag it."), structured=spec, **sampling)
    _stopped(events)
    match = re.fullmatch(r"<a>(.*)</a>", text, re.DOTALL)
    assert match, text
    _validate(json.loads(match.group(1)), SMALL)


@pytest.mark.parametrize("sampling", [{}, SAMPLED[0]], ids=["greedy", "sampled"])
def test_structural_tag_legacy_form(runner: Runner, sampling: dict[str, Any]) -> None:
    """vLLM's legacy ``structures``/``triggers`` form: free text, and whatever follows a
    trigger is the tag's schema then its end."""
    tag = {"type": "structural_tag", "triggers": ["<a>"],
           "structures": [{"begin": "<a>", "schema": SMALL, "end": "</a>"}]}  # fmt: skip
    spec = StructuredOutput("structural_tag", json.dumps(tag))
    text, events = runner.one(runner.chat("What is the capital of France?"), structured=spec,
                              max_tokens=40, **sampling)  # fmt: skip
    assert events[-1].finish_reason in ("stop", "length")
    for body in re.findall(r"<a>(.*?)</a>", text, re.DOTALL):
        _validate(json.loads(body), SMALL)


# --- the batch -------------------------------------------------------------------------------
def test_constrained_and_free_rows_share_a_batch(runner: Runner) -> None:
    """Unconstrained rows beside constrained ones generate what they generate alone."""
    question = "What is the capital of France?"
    chat = (runner.chat(question), SamplingParams(max_tokens=16, temperature=0.0))
    story = (runner.raw(STORY_PROMPT), SamplingParams(max_tokens=STORY_TOKENS, temperature=0.0))
    alone = [runner.text(events) for events in (runner.run(chat)[0], runner.run(story)[0])]
    assert alone[0] == CHAT_ANSWERS[question]
    assert alone[1].startswith(STORY_CONTINUATION) or STORY_CONTINUATION.startswith(alone[1])

    specs = [_json(PERSON, disable_any_whitespace=True), StructuredOutput("regex", EMAIL)]
    for spec in specs:
        runner.engine.check_structured_output(spec)  # compiled: generate() queues at once
    constrained = [
        (runner.chat("Give me a JSON object."),
         SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured=specs[0])),
        (runner.chat("Your email?"),
         SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, structured=specs[1])),
    ]  # fmt: skip
    runner.engine.max_step_size = 0
    results = runner.run(constrained[0], story, chat, constrained[1])
    assert runner.engine.max_step_size >= 3  # they really were decoded together
    assert [runner.text(results[2]), runner.text(results[1])] == alone
    _validate(json.loads(runner.text(results[0])), PERSON)
    assert re.fullmatch(EMAIL, runner.text(results[3]))
    for events in (results[0], results[3]):
        _stopped(events)


def test_sampled_constrained_rows_are_reproducible_with_a_seed(runner: Runner) -> None:
    spec = StructuredOutput("regex", EMAIL)
    params = {"structured": spec, "temperature": 1.0, "seed": 11}
    first, _ = runner.one(runner.chat("Your email?"), **params)
    again, _ = runner.one(runner.chat("Your email?"), **params)
    assert first == again and re.fullmatch(EMAIL, first)


@pytest.mark.parametrize("fault", ["rejected", "no token"])
def test_a_grammar_fault_fails_only_its_request(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A token the matcher refuses, or a mask that leaves no token (neither happens with a
    sound grammar), ends that request with an error, as vLLM does; the batch goes on."""
    from lmserve_backend_hf import structured

    if fault == "rejected":
        monkeypatch.setattr(
            structured, "accept_tokens", lambda grammars, tokens: [False] * len(tokens)
        )
    else:
        monkeypatch.setattr(structured.GrammarBitmask, "_without_tokens",
                            lambda self, index, count: list(index))  # fmt: skip
    question = "What is the capital of France?"
    spec = StructuredOutput("regex", EMAIL)
    runner.engine.check_structured_output(spec)

    async def both() -> list[Any]:
        return list(await asyncio.gather(
            runner._events(runner.chat("Your email?"),
                           SamplingParams(max_tokens=20, temperature=1.0, seed=1, structured=spec)),
            runner._events(runner.chat(question), SamplingParams(max_tokens=16, temperature=0.0)),
            return_exceptions=True,
        ))  # fmt: skip

    failed, free = runner.loop.run_until_complete(both())
    assert isinstance(failed, BackendError) and fault in str(failed)
    assert runner.text(free) == CHAT_ANSWERS[question]
    runner.engine.check_health()


# --- with the other sampling parameters ------------------------------------------------------
def test_grammar_wins_over_min_tokens(runner: Runner) -> None:
    """min_tokens masks EOS, but a finished grammar allows nothing else: it ends anyway."""
    spec = StructuredOutput("choice", json.dumps(["yes", "no"]))
    text, events = runner.one(runner.chat("Yes or no?"), structured=spec, min_tokens=20)
    _stopped(events)
    assert text in ("yes", "no")


def test_min_tokens_still_applies_inside_the_grammar(runner: Runner) -> None:
    """While the grammar can go on, EOS stays masked until min_tokens (vLLM's)."""
    spec = StructuredOutput("regex", r"[a-z]{1,30}")
    text, events = runner.one(runner.chat("Yes or no?"), structured=spec, min_tokens=8)
    _stopped(events)
    assert re.fullmatch(r"[a-z]{1,30}", text)
    assert len(events) >= 9 or len(text) == 30


def test_with_ignore_eos_the_sequence_goes_on_after_the_grammar(runner: Runner) -> None:
    """vLLM's: the grammar ends with EOS (it is still a stop token of the grammar), which does
    not end the sequence; what follows is unconstrained, up to max_tokens."""
    spec = StructuredOutput("choice", json.dumps(CHOICES))
    _, events = runner.one(runner.chat("Yes or no?"), structured=spec, ignore_eos=True,
                           max_tokens=12)  # fmt: skip
    assert events[-1].finish_reason == "length" and len(events) == 12
    ids = [e.token_id for e in events]
    end = next(i for i, t in enumerate(ids) if t in runner.engine.eos_token_ids)
    assert runner.tokenizer.decode(ids[:end]) in CHOICES
    assert not any(e.is_stop_token for e in events)


def test_a_stop_token_ends_the_grammar_and_the_sequence(runner: Runner) -> None:
    """stop_token_ids are stop tokens of the grammar too (vLLM's all_stop_token_ids)."""
    spec = StructuredOutput("choice", json.dumps(["yes", "no"]))
    stop = runner.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text, events = runner.one(runner.chat("Yes or no?"), structured=spec, ignore_eos=True,
                              stop_token_ids=(stop,), logit_bias={stop: 50.0})  # fmt: skip
    _stopped(events)
    assert text in ("yes", "no") and events[-1].token_id == stop == events[-1].stop_reason


def test_logit_bias_cannot_leave_the_grammar(runner: Runner) -> None:
    vocab = _vocab(runner)
    spec = StructuredOutput("choice", json.dumps(["yes", "no"]))
    # A huge bias on a token the grammar never allows changes nothing about the output's shape.
    banned = next(t for t, s in vocab.items() if s == "z")
    text, events = runner.one(runner.chat("Yes or no?"), structured=spec,
                              logit_bias={banned: 100.0})  # fmt: skip
    _stopped(events)
    assert text in ("yes", "no")
    # ... and one on an allowed token picks that branch.
    n_token = runner.tokenizer("no", add_special_tokens=False)["input_ids"][0]
    text, _ = runner.one(runner.chat("Yes or no?"), structured=spec, logit_bias={n_token: 100.0})
    assert text == "no"


def test_logprobs_are_taken_after_the_grammars_mask(runner: Runner) -> None:
    """As vLLM's sampler: log-softmax over what the grammar allows (the rest is -inf)."""
    prompt = runner.chat("Yes or no?")
    spec = StructuredOutput("choice", json.dumps(["yes", "no"]))
    _, free = runner.one(prompt, logprobs=5, max_tokens=1)
    _, constrained = runner.one(prompt, structured=spec, logprobs=5)
    free_lp, constrained_lp = free[0].logprob, constrained[0].logprob
    assert free_lp is not None and constrained_lp is not None
    allowed = [(t, lp) for t, lp in constrained_lp.top if lp > float("-inf")]
    assert allowed and len(allowed) <= 2  # a first token of "yes" or of "no"
    assert constrained_lp.token_id in [t for t, _ in allowed]
    # The allowed tokens share all the probability: each is likelier than unconstrained.
    assert sum(math.exp(lp) for _, lp in allowed) <= 1.0 + 1e-5
    free_all = dict(free_lp.top)
    for token, lp in allowed:
        if token in free_all:
            assert lp >= free_all[token] - 1e-6


# --- compiling ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,value,message",
    [
        ("regex", "(a", "regular expression does not compile: .*parenthesis"),
        ("regex", "a\x00b", "NUL"),
        ("json", '{"type": 5}', "JSON schema does not compile"),
        ("json", "not json", "JSON schema is not valid JSON"),
        ("json", '{"type": "array", "items": ' * 70 + "{}" + "}" * 70, "nested too deeply"),
        ("grammar", "root ::= foo", 'grammar does not compile: .*"foo"'),
        ("grammar", "start: (", "grammar does not compile"),
        ("choice", "[]", "non-empty list of strings"),
        ("choice", '["a", 1]', "non-empty list of strings"),
        ("choice", "[", "choice list is not valid JSON"),
        (
            "structural_tag",
            '{"structures": [{"begin": "<a>"}], "triggers": ["<a>"]}',
            "structural tag does not compile",
        ),
        (
            "structural_tag",
            '{"type": "structural_tag", "format": {"type": "nope"}}',
            "structural tag does not compile",
        ),
        ("structural_tag", "{", "structural tag is not valid JSON"),
    ],
)
def test_invalid_specs_are_invalid_input(
    runner: Runner, kind: Any, value: str, message: str
) -> None:
    spec = StructuredOutput(kind, value)
    with pytest.raises(InvalidInput, match=message) as caught:
        runner.engine.check_structured_output(spec)
    assert "/project/cpp" not in caught.value.message  # xgrammar's source location is cut
    # generate() refuses it too, before anything is queued.
    with pytest.raises(InvalidInput, match=message):
        runner.one(runner.chat("hi"), structured=spec)


def test_compiled_grammars_are_cached(runner: Runner) -> None:
    cache = runner.engine.grammar_cache
    spec = _json({"type": "object", "properties": {"k": {"type": "string"}}})
    runner.engine.check_structured_output(spec)
    size = len(cache)
    runner.engine.check_structured_output(spec)
    assert len(cache) == size
    first = cache.compile(spec)
    assert cache.compile(spec) is first
    assert cache.get(spec) is first
    # Options xgrammar has no use for share the entry; one it compiles differently does not.
    ws = StructuredOutput(spec.kind, spec.value, whitespace_pattern=r"[ ]?")
    assert cache.compile(ws) is first
    compact = StructuredOutput(spec.kind, spec.value, disable_any_whitespace=True)
    assert cache.compile(compact) is not first


def test_the_cache_is_bounded_and_thread_safe(runner: Runner) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from lmserve_backend_hf.structured import GrammarCache

    cache = GrammarCache(runner.tokenizer, runner.engine.vocab_size, max_entries=3)
    spec = StructuredOutput("json", json.dumps(PERSON))
    with ThreadPoolExecutor(8) as pool:  # many requests for one spec at once: one compile
        compiled = list(pool.map(cache.compile, [spec] * 16))
    assert all(c is compiled[0] for c in compiled)
    specs = [StructuredOutput("regex", f"[a-z]{{{n}}}") for n in range(1, 6)]
    for item in specs:
        cache.compile(item)
    assert len(cache) == 3
    assert cache.get(spec) is None and cache.get(specs[1]) is None  # least recently used
    assert cache.get(specs[-1]) is not None


def test_an_engine_without_a_tokenizer_refuses_structured_outputs(runner: Runner) -> None:
    from lmserve_backend_hf.engine import HFGenerationEngine

    e = runner.engine
    bare = HFGenerationEngine(e.model, device=e.device, eos_token_ids=e.eos_token_ids,
                              pad_token_id=e.pad_token_id, max_model_len=e.max_model_len,
                              vocab_size=e.vocab_size)  # fmt: skip
    with pytest.raises(InvalidInput, match="without the model's tokenizer"):
        bare.check_structured_output(StructuredOutput("regex", "a"))


def test_choice_grammar_escapes_literals() -> None:
    from lmserve_backend_hf.structured import choice_grammar, grammar_is_lark

    assert choice_grammar(['a"b', "c\\d", "e\nf", "\x01"]) == (
        'root ::= "a\\"b" | "c\\\\d" | "e\\nf" | "\\u0001"'
    )
    assert not grammar_is_lark('root ::= "a"  # comment')
    assert grammar_is_lark('start: "a"\n// root ::= "b"')


def _vocab(runner: Runner) -> dict[int, str]:
    tok = runner.tokenizer
    return {i: tok.decode([i]) for i in range(runner.engine.vocab_size)}
