"""What every trained tiny model must do, checked right after training, before it is cached.

Training is not portable: the same seed and steps learn other answers on another CPU's kernels
(AVX-512, AVX2, ``ATEN_CPU_CAPABILITY=default``) or thread count. So ``tiny_models.model_path``
publishes a model only once it shows every behaviour below, and trains again (another seed,
more epochs) when one is missing. Tests assert these behaviours and nothing else about a trained
model's answers (or compare two paths on the same model); the constants here are what they
import.

Two kinds of check:

- **answers**: the documented answer, with the winning logit ahead of the runner-up by
  ``MARGIN`` at every step, so other kernels, batch shapes, padding, vLLM, ONNX Runtime and
  Triton (all float32) cannot flip it;
- **decisive choices**: inputs whose outputs no test asserts but which tests compare across two
  paths (ONNX vs torch, vLLM vs transformers, Ray vs one server): every compared argmax or rank
  is ahead by ``DECISIVE`` (10x the 1e-4 differences those paths show), so a near tie cannot
  make two correct paths disagree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Logit lead of every asserted choice over the runner-up (a probability ratio of e ≈ 2.7).
MARGIN = 1.0
# Logit lead of every choice two paths are compared on.
DECISIVE = 1e-3

# --------------------------------------------------------------------------- what tests assert

SENTIMENT_MIN_SCORE = 0.9  # what tests assert; the builder asks for VERIFIED_MIN_SCORE
VERIFIED_MIN_SCORE = 0.95
SENTIMENT = {
    "I love this": "POSITIVE",
    "I hate this": "NEGATIVE",
    "i love this movie": "POSITIVE",
    "i hate this movie": "NEGATIVE",
    "i really love this movie": "POSITIVE",
}
# Compared between paths (ONNX/Triton/Ray vs one server), never asserted.
SENTIMENT_COMPARED = [
    "what a day",
    "this is great",
    "awful, just awful",
    "I love this movie",
    "I love this so much",
    "hate",
    "the film was fine " * 20,
]

NER_SENTENCE = "Alice lives in Paris and works at Google"
NER_TAGS = ["B-PER", "O", "O", "B-LOC", "O", "O", "O", "B-ORG"]  # one per word of NER_SENTENCE
# "Alice visited Paris" repeated 1..5 times: the first "Alice" is B-PER (tests need an entity;
# later repeats sit at positions no training sentence reaches, so no tag is promised there).
NER_REPEATED = [" ".join(["Alice visited Paris"] * k) for k in range(1, 6)]
NER_COMPARED = ["bob visited berlin", "hi", "Alice lives in Paris"]

FILL_MASK = {
    "The capital of France is [MASK].": "paris",
    "the capital of germany is [MASK].": "berlin",
    "the capital of italy is [MASK].": "rome",
    "the capital of spain is [MASK].": "madrid",
    "the capital of japan is [MASK] .": "tokyo",
    "the capital of france is [MASK] .": "paris",
}
FILL_MASK_TOP_K = 5  # the fill-mask default; tests compare the top 3 and 5 across paths

CHAT_ANSWERS = {  # llama, greedy, one user message in ChatML, then <|im_end|>
    "What is the capital of France?": "Paris.",
    "What is the capital of Germany?": "Berlin.",
    "What is the capital of Italy?": "Rome.",
    "What is the capital of Spain?": "Madrid.",
    "What is the capital of Japan?": "Tokyo.",
    "Name the capital of Germany.": "Berlin.",
}
# Answered together in one left-padded batch, as the Hugging Face backend batches them.
BATCHED_CHAT = ["What is the capital of France?", "Name the capital of Germany."]
RAW_COMPLETIONS = {  # llama and gpt2, greedy, then <|endoftext|>
    "the capital of france is": " paris.",
    "the capital of germany is": " berlin.",
    "the capital of italy is": " rome.",
    "the capital of spain is": " madrid.",
    "the capital of japan is": " tokyo.",
}
STORY_PROMPT = "once upon a time"
STORY_TOKENS = 40  # greedy tokens that follow the memorised story with no end-of-sequence
STORY_CONTINUATION = (
    " there was a little red fox who lived in a big green forest near a quiet river. every "
    "morning the fox walked down to the water to drink"
)  # a prefix of the continuation; the 40 tokens may go on past it
# "tools": tool calls in Hermes / Qwen2.5 form and reasoning in <think> (vLLM's ``hermes`` tool
# parser and ``deepseek_r1`` reasoning parser). Every answer below ends with <|im_end|>.
WEATHER_TOOL = {  # as the OpenAI SDK sends it; the chat template renders it with tojson
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER = {"Paris": "sunny", "Berlin": "rainy", "Rome": "sunny", "Madrid": "hot", "Tokyo": "cloudy"}
CITY_COUNTRIES = {
    "Paris": "France",
    "Berlin": "Germany",
    "Rome": "Italy",
    "Madrid": "Spain",
    "Tokyo": "Japan",
}


def thinking(reasoning: str, content: str) -> str:
    """An answer that reasons first: what ``deepseek_r1`` splits into reasoning and content."""
    return f"<think>\n{reasoning}\n</think>\n\n{content}"


def weather_question(*cities: str) -> str:
    return f"What is the weather in {' and '.join(cities)}?"


def weather_arguments(city: str) -> str:
    """The arguments of a get_weather call as OpenAI returns them: a JSON string."""
    return json.dumps({"city": city})


def tool_call_text(city: str) -> str:
    """One Hermes tool call, as the model writes it (and the chat template renders it)."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
    return f"<tool_call>\n{call}\n</tool_call>"


def weather_report(city: str) -> str:
    """What get_weather returns for ``city``: the tool message's content."""
    return json.dumps({"city": city, "weather": WEATHER[city]})


def tool_result_messages(city: str, question: str | None = None) -> list[dict[str, Any]]:
    """The user's question, the assistant's get_weather call (OpenAI shape, arguments as a JSON
    string, no content) and the tool's answer: the history TOOL_RESULT_ANSWERS answers."""
    return [
        {"role": "user", "content": question or weather_question(city)},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": weather_arguments(city)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": weather_report(city)},
    ]


# With tools=[WEATHER_TOOL], one user message: reasoning, then the call.
TOOL_CALL_ANSWERS = {
    weather_question(city): thinking(f"The user wants the weather in {city}.", tool_call_text(city))
    for city in WEATHER
}
# Two cities: two calls (parallel tool calls) separated by "\n".
PARALLEL_TOOL_CALL_ANSWERS = {
    weather_question(a, b): thinking(
        f"The user wants the weather in {a} and {b}.", tool_call_text(a) + "\n" + tool_call_text(b)
    )
    for a, b in [("Paris", "Berlin"), ("Rome", "Tokyo"), ("Madrid", "Paris")]
}
# With tools=[WEATHER_TOOL], after tool_result_messages(city): reasoning, then the answer.
TOOL_RESULT_ANSWERS = {
    city: thinking(f"The tool says it is {weather}.", f"It is {weather} in {city}.")
    for city, weather in WEATHER.items()
}
# The same weather questions without tools: reasoning, then a plain answer (no call).
NO_TOOL_ANSWERS = {
    weather_question(city): thinking(
        f"The user wants the weather in {city}.", f"I cannot check the weather in {city}."
    )
    for city in WEATHER
}
# With or without tools: reasoning, then the capital (no call).
THINKING_CHAT_ANSWERS = {
    f"What is the capital of {country}?": thinking(f"The user asks about {country}.", f"{city}.")
    for city, country in CITY_COUNTRIES.items()
}
# Without tools, no reasoning: a JSON object (for structured outputs).
JSON_ANSWERS = {f"Give the weather in {city} as JSON.": weather_report(city) for city in WEATHER}
T5_ANSWERS = {  # greedy: the word as one token, then </s>
    "capital of france:": "paris",
    "capital of germany:": "berlin",
    "capital of italy:": "rome",
    "capital of spain:": "madrid",
    "capital of japan:": "tokyo",
    "country of paris:": "france",
}


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Behaviour:
    """One thing a trained model must do; ``check`` returns what it did instead, or None."""

    description: str
    check: Callable[[Loaded], str | None]


@dataclass
class Loaded:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel


def behaviours(name: str) -> list[Behaviour]:
    """Every behaviour the model ``name`` must show (none for the untrained embedding models)."""
    return _BEHAVIOURS.get(name, lambda: [])()


def verify(name: str, directory: Path) -> list[str]:
    """Load ``directory`` as tests do and return each missing behaviour with what happened."""
    wanted = behaviours(name)
    if not wanted:
        return []
    loaded = _load(name, directory)
    missing = []
    for behaviour in wanted:
        got = behaviour.check(loaded)
        if got is not None:
            missing.append(f"{behaviour.description}: {got}")
    return missing


def _load(name: str, directory: Path) -> Loaded:
    import transformers

    auto = {
        "sentiment": transformers.AutoModelForSequenceClassification,
        "ner": transformers.AutoModelForTokenClassification,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "llama": transformers.AutoModelForCausalLM,
        "tools": transformers.AutoModelForCausalLM,
        "gpt2": transformers.AutoModelForCausalLM,
        "t5": transformers.AutoModelForSeq2SeqLM,
    }[name]
    model = auto.from_pretrained(directory, dtype="float32")
    model.eval()
    return Loaded(transformers.AutoTokenizer.from_pretrained(directory), model)


def _lead(scores: torch.Tensor) -> float:
    """How far the best score is ahead of the second."""
    top = scores.float().topk(2).values
    return float(top[0] - top[1])


def _ranks_lead(scores: torch.Tensor, k: int) -> float:
    """The smallest gap between neighbours among the k best scores and the one after them."""
    top = scores.float().topk(k + 1).values
    return float((top[:-1] - top[1:]).min())


# --- encoders


def _logits(loaded: Loaded, text: str) -> tuple[torch.Tensor, Any]:
    import torch

    encoding = loaded.tokenizer(text, return_tensors="pt", truncation=True)
    with torch.no_grad():
        return loaded.model(**encoding).logits[0], encoding


def _classifies(text: str, label: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, _ = _logits(loaded, text)
        probs = logits.softmax(-1)
        got = loaded.model.config.id2label[int(probs.argmax())]
        if got != label or float(probs.max()) < VERIFIED_MIN_SCORE:
            return f"{got} {float(probs.max()):.3f}"
        return None

    return Behaviour(f"{text!r} -> {label} with score >= {VERIFIED_MIN_SCORE}", check)


def _decisive_class(text: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, _ = _logits(loaded, text)
        lead = _lead(logits)
        return None if lead >= DECISIVE else f"lead {lead:.2e}"

    return Behaviour(f"{text[:40]!r} classified by a lead >= {DECISIVE}", check)


def _tags(words: str, tags: Sequence[str]) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, encoding = _logits(loaded, words)
        id2label = loaded.model.config.id2label
        word_ids = encoding.word_ids(0)
        # Every word is one token, so each tag is the tag of a whole word (the server's
        # "simple" aggregation groups exactly these).
        if [w for w in word_ids if w is not None] != list(range(len(words.split()))):
            return f"words split into pieces: {loaded.tokenizer.tokenize(words)}"
        rows = [row for row, w in zip(logits, word_ids, strict=True) if w is not None]
        got = [id2label[int(row.argmax())] for row in rows]
        leads = [_lead(row) for row in rows]
        if got != list(tags) or min(leads) < MARGIN:
            return f"{got} (smallest lead {min(leads):.2f})"
        return None

    return Behaviour(f"{words!r} -> {' '.join(tags)}", check)


def _first_word_is_person(text: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, _ = _logits(loaded, text)
        row = logits[1]  # after [CLS]
        got = loaded.model.config.id2label[int(row.argmax())]
        return None if got == "B-PER" and _lead(row) >= MARGIN else f"{got} ({_lead(row):.2f})"

    return Behaviour(f"the first word of {text!r} -> B-PER", check)


def _decisive_tokens(text: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, _ = _logits(loaded, text)
        lead = min(_lead(row) for row in logits)
        return None if lead >= DECISIVE else f"lead {lead:.2e}"

    return Behaviour(
        f"every token of {text!r} (specials too) tagged by a lead >= {DECISIVE}", check
    )


def _fills(text: str, answer: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        logits, encoding = _logits(loaded, text)
        position = encoding["input_ids"][0].tolist().index(loaded.tokenizer.mask_token_id)
        row = logits[position]
        got = loaded.tokenizer.convert_ids_to_tokens(int(row.argmax()))
        lead, ranks = _lead(row), _ranks_lead(row, FILL_MASK_TOP_K)
        if got != answer or lead < MARGIN or ranks < DECISIVE:
            return (
                f"{got!r} (lead {lead:.2f}, smallest gap in the top {FILL_MASK_TOP_K} {ranks:.2e})"
            )
        return None

    return Behaviour(f"{text!r} -> {answer!r} (its top {FILL_MASK_TOP_K} in a stable order)", check)


# --- generation


def _greedy(
    loaded: Loaded, prompts: list[str], max_new_tokens: int
) -> list[tuple[list[int], float]]:
    """Greedy new tokens of each prompt (one batch, left-padded) and each one's smallest lead.

    Steps after a row's end-of-sequence only pad, so they do not count.
    """
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    # GPT-2 has no pad token; generate() pads finished rows with it, as GPT-2 users pass eos.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoding = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1)
    with torch.no_grad():
        out = model.generate(
            **encoding,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    start = 1 if model.config.is_encoder_decoder else encoding["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row in range(len(prompts)):
        new = out.sequences[row, start:].tolist()
        ended = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        new = new[:ended]
        lead = min(_lead(step[row]) for step in out.logits[:ended])
        results.append((new, lead))
    return results


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    return prompt


def _answers_then(
    prompts: Callable[[PreTrainedTokenizerBase], list[str]],
    answers: list[str],
    stop: str,
    description: str,
    max_new_tokens: int = 16,
) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        tokenizer = loaded.tokenizer
        results = _greedy(loaded, prompts(tokenizer), max_new_tokens=max_new_tokens)
        wrong = []
        for answer, (new, lead) in zip(answers, results, strict=True):
            text = tokenizer.decode(new)
            if text != answer + stop or lead < MARGIN:
                wrong.append(f"{text!r} (smallest lead {lead:.2f})")
        return "; ".join(wrong) or None

    return Behaviour(description, check)


def _chat(question: str, answer: str) -> Behaviour:
    return _answers_then(
        lambda tokenizer: [_chat_prompt(tokenizer, question)],
        [answer],
        "<|im_end|>",
        f"chat {question!r} -> {answer!r} then <|im_end|>",
    )


def _batched_chat(questions: list[str]) -> Behaviour:
    return _answers_then(
        lambda tokenizer: [_chat_prompt(tokenizer, q) for q in questions],
        [CHAT_ANSWERS[q] for q in questions],
        "<|im_end|>",
        f"chat {questions} left-padded in one batch -> {[CHAT_ANSWERS[q] for q in questions]}",
    )


def _tools_chat(
    messages: list[dict[str, Any]], answer: str, *, tools: bool, description: str
) -> Behaviour:
    def prompt(tokenizer: PreTrainedTokenizerBase) -> list[str]:
        text = tokenizer.apply_chat_template(
            messages,
            tools=[WEATHER_TOOL] if tools else None,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)
        return [text]

    with_tools = "with tools" if tools else "without tools"
    return _answers_then(
        prompt,
        [answer],
        "<|im_end|>",
        f"{description} {with_tools} -> {answer!r} then <|im_end|>",
        max_new_tokens=len(answer) + 1,  # every token is at least one character, then the stop
    )


def _tools_behaviours() -> list[Behaviour]:
    def user(question: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": question}]

    tool_calls = {**TOOL_CALL_ANSWERS, **PARALLEL_TOOL_CALL_ANSWERS}
    return [
        *(_tools_chat(user(q), a, tools=True, description=repr(q)) for q, a in tool_calls.items()),
        *(
            _tools_chat(tool_result_messages(city), a, tools=True, description=f"{city}'s result")
            for city, a in TOOL_RESULT_ANSWERS.items()
        ),
        *(
            _tools_chat(user(q), a, tools=False, description=repr(q))
            for q, a in NO_TOOL_ANSWERS.items()
        ),
        *(
            _tools_chat(user(q), a, tools=tools, description=repr(q))
            for tools in (False, True)
            for q, a in THINKING_CHAT_ANSWERS.items()
        ),
        *(
            _tools_chat(user(q), a, tools=False, description=repr(q))
            for q, a in JSON_ANSWERS.items()
        ),
    ]


def _completes(prompt: str, answer: str) -> Behaviour:
    return _answers_then(
        lambda tokenizer: [prompt],
        [answer],
        "<|endoftext|>",
        f"{prompt!r} -> {answer!r} then <|endoftext|>",
    )


def _story() -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        ((new, lead),) = _greedy(loaded, [STORY_PROMPT], max_new_tokens=STORY_TOKENS)
        text = loaded.tokenizer.decode(new)
        if len(new) != STORY_TOKENS or lead < MARGIN:
            return f"{len(new)} tokens {text!r} (smallest lead {lead:.2f})"
        if not (text.startswith(STORY_CONTINUATION) or STORY_CONTINUATION.startswith(text)):
            return repr(text)
        return None

    return Behaviour(
        f"{STORY_PROMPT!r} -> {STORY_TOKENS} tokens of the story, no end of sequence", check
    )


def _t5_answers(prompt: str, answer: str) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        tokenizer = loaded.tokenizer
        ((new, lead),) = _greedy(loaded, [prompt], max_new_tokens=8)
        expected = [tokenizer.convert_tokens_to_ids(f"\u2581{answer}"), tokenizer.eos_token_id]
        if new != expected or lead < MARGIN:
            return f"{tokenizer.convert_ids_to_tokens(new)} (smallest lead {lead:.2f})"
        return None

    return Behaviour(f"{prompt!r} -> {answer!r} then </s>", check)


def _t5_batched(prompts: list[str]) -> Behaviour:
    def check(loaded: Loaded) -> str | None:
        tokenizer = loaded.tokenizer
        got = [
            (tokenizer.decode(new, skip_special_tokens=True), lead)
            for new, lead in _greedy(loaded, prompts, max_new_tokens=8)
        ]
        if [text for text, _ in got] != [T5_ANSWERS[p] for p in prompts] or min(
            lead for _, lead in got
        ) < MARGIN:
            return repr(got)
        return None

    return Behaviour(f"{prompts} padded in one batch -> {[T5_ANSWERS[p] for p in prompts]}", check)


_BEHAVIOURS: dict[str, Callable[[], list[Behaviour]]] = {
    "sentiment": lambda: [
        *(_classifies(text, label) for text, label in SENTIMENT.items()),
        *(_decisive_class(text) for text in SENTIMENT_COMPARED),
    ],
    "ner": lambda: [
        _tags(NER_SENTENCE, NER_TAGS),
        *(_first_word_is_person(text) for text in NER_REPEATED),
        *(_decisive_tokens(text) for text in [NER_SENTENCE, *NER_REPEATED, *NER_COMPARED]),
    ],
    "masked_lm": lambda: [_fills(text, answer) for text, answer in FILL_MASK.items()],
    "llama": lambda: [
        *(_chat(q, a) for q, a in CHAT_ANSWERS.items()),
        _batched_chat(BATCHED_CHAT),
        *(_completes(p, a) for p, a in RAW_COMPLETIONS.items()),
        _story(),
    ],
    "tools": _tools_behaviours,
    "gpt2": lambda: [*(_completes(p, a) for p, a in RAW_COMPLETIONS.items()), _story()],
    "t5": lambda: [
        *(_t5_answers(p, a) for p, a in T5_ANSWERS.items()),
        _t5_batched(list(T5_ANSWERS)[:2]),
    ],
}
