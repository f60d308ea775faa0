"""The tiny generative models load from disk with plain transformers and answer greedily as documented."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from _support import tiny_model_checks
from _support.tiny_model_checks import (
    BATCHED_CHAT,
    CHAT_ANSWERS,
    JSON_ANSWERS,
    NO_TOOL_ANSWERS,
    PARALLEL_TOOL_CALL_ANSWERS,
    RAW_COMPLETIONS,
    STORY_CONTINUATION,
    STORY_PROMPT,
    STORY_TOKENS,
    T5_ANSWERS,
    THINKING_CHAT_ANSWERS,
    TOOL_CALL_ANSWERS,
    TOOL_RESULT_ANSWERS,
    WEATHER,
    WEATHER_TOOL,
    tool_result_messages,
)
from _support.tiny_models import TOOL_TAGS, VERIFIED_FILE, model_path

pytestmark = pytest.mark.slow

ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
    "t5": ("t5", "T5ForConditionalGeneration"),
}
# ASCII with runs of spaces, punctuation and control whitespace, plus multi-byte characters.
BYTE_LEVEL_TEXT = "Hello,  world!\tIt's 42 (ok?) -- done.\nCafé: 5 € / naïve 日本"
ASCII_TEXT = "Hello, world! It's 42 (ok?) -- a [test] of #t5 & more."


def _load(name: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    path = model_path(name)
    auto = AutoModelForSeq2SeqLM if name == "t5" else AutoModelForCausalLM
    return AutoTokenizer.from_pretrained(path), auto.from_pretrained(path)


def _generate(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, prompt: str, max_new_tokens: int
) -> list[int]:
    """Greedy new token ids for ``prompt`` (for T5 the decoder output after its start token)."""
    encoding = tokenizer(prompt, return_tensors="pt")
    # GPT-2 has no pad token; pass its eos as GPT-2 users do, so generate() needs no guess.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(
            **encoding, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
    if model.config.is_encoder_decoder:
        assert int(output[0, 0]) == model.config.decoder_start_token_id
        return output[0, 1:].tolist()
    assert output[0, : encoding["input_ids"].shape[1]].tolist() == encoding["input_ids"][0].tolist()
    return output[0, encoding["input_ids"].shape[1] :].tolist()


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    return prompt


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_model_loads_offline_with_a_fast_tokenizer(name: str) -> None:
    path = model_path(name)
    config = AutoConfig.from_pretrained(path)
    model_type, architecture = ARCHITECTURES[name]
    assert (config.model_type, config.architectures) == (model_type, [architecture])
    tokenizer, model = _load(name)
    assert type(model).__name__ == architecture
    assert tokenizer.is_fast
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.model_max_length == 256
    assert model.generation_config.do_sample is False
    assert (path / "generation_config.json").is_file()
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_shapes_fit_vllm_cpu_attention() -> None:
    llama = AutoConfig.from_pretrained(model_path("llama"))
    assert (llama.hidden_size, llama.num_hidden_layers, llama.intermediate_size) == (64, 2, 128)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim) == (2, 2, 32)
    assert llama.max_position_embeddings == 256
    gpt2 = AutoConfig.from_pretrained(model_path("gpt2"))
    assert (gpt2.n_embd, gpt2.n_head, gpt2.n_layer, gpt2.n_positions) == (64, 2, 2, 256)
    t5 = AutoConfig.from_pretrained(model_path("t5"))
    assert (t5.d_model, t5.d_kv, t5.num_heads, t5.d_ff) == (64, 32, 2, 128)
    assert (t5.num_layers, t5.num_decoder_layers) == (2, 2)


def test_special_token_ids() -> None:
    llama, _ = _load("llama")
    assert llama.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (0, 2, 0)
    assert llama.unk_token_id is None  # byte-level: nothing is unknown
    llama_config = AutoConfig.from_pretrained(model_path("llama"))
    assert (llama_config.bos_token_id, llama_config.eos_token_id) == (0, 2)
    assert llama_config.pad_token_id == 0
    _, llama_model = _load("llama")
    assert llama_model.generation_config.eos_token_id == [2, 0]
    assert llama_model.generation_config.pad_token_id == 0

    gpt2, gpt2_model = _load("gpt2")
    assert gpt2.all_special_tokens == ["<|endoftext|>"]
    assert (gpt2.bos_token_id, gpt2.eos_token_id, gpt2.unk_token_id) == (0, 0, 0)
    assert gpt2.pad_token_id is None  # as real GPT-2
    assert gpt2.chat_template is None
    assert gpt2_model.generation_config.eos_token_id == 0

    t5, t5_model = _load("t5")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id, t5.bos_token_id) == (0, 1, 2, None)
    assert t5_model.config.decoder_start_token_id == 0
    assert t5_model.generation_config.decoder_start_token_id == 0
    assert t5_model.generation_config.eos_token_id == 1
    extra = [f"<extra_id_{i}>" for i in range(10)]
    assert set(extra) <= set(t5.all_special_tokens)
    extra_ids = t5.convert_tokens_to_ids(extra)
    assert extra_ids == list(range(len(t5) - 10, len(t5)))
    assert t5("<extra_id_0> paris")["input_ids"] == [
        extra_ids[0],
        t5.convert_tokens_to_ids("▁paris"),
        1,
    ]


def test_llama_chat_template() -> None:
    tokenizer, _ = _load("llama")
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    assert (
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        tokenizer.apply_chat_template(conversation, tokenize=False)
        == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )
    # No automatic BOS: the prompt's own <|im_start|> comes first, once.
    ids = tokenizer(_chat_prompt(tokenizer, "What is the capital of France?"))["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.bos_token_id not in ids
    assert tokenizer("once upon a time")["input_ids"][0] != tokenizer.bos_token_id
    template = (model_path("llama") / "tokenizer_config.json").read_text()
    assert '"chat_template"' in template and '"add_bos_token": false' in template


@pytest.mark.parametrize(("question", "answer"), CHAT_ANSWERS.items())
def test_llama_chat_answers_then_stops(question: str, answer: str) -> None:
    tokenizer, model = _load("llama")
    new = _generate(tokenizer, model, _chat_prompt(tokenizer, question), max_new_tokens=16)
    assert tokenizer.decode(new, skip_special_tokens=True) == answer
    # The answer ends with the chat eos (<|im_end|>), which stops generation.
    assert new[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(new) == answer + "<|im_end|>"


def test_llama_batched_left_padded_chat_matches_serial() -> None:
    tokenizer, model = _load("llama")
    tokenizer.padding_side = "left"
    prompts = [_chat_prompt(tokenizer, question) for question in BATCHED_CHAT]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # really padded
    with torch.no_grad():
        output = model.generate(**batch, do_sample=False, max_new_tokens=8)
    answers = tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answers == [CHAT_ANSWERS[question] for question in BATCHED_CHAT]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize(("prompt", "answer"), RAW_COMPLETIONS.items())
def test_raw_completion(name: str, prompt: str, answer: str) -> None:
    tokenizer, model = _load(name)
    new = _generate(tokenizer, model, prompt, max_new_tokens=8)
    assert tokenizer.decode(new) == answer + "<|endoftext|>"
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_story_runs_to_the_length_limit(name: str) -> None:
    tokenizer, model = _load(name)
    new = _generate(tokenizer, model, STORY_PROMPT, max_new_tokens=STORY_TOKENS)
    assert len(new) == STORY_TOKENS
    eos_ids = model.generation_config.eos_token_id
    assert not set(new) & set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    text = tokenizer.decode(new)
    assert text.startswith(" there was a little red fox who lived in a big")
    assert text.startswith(STORY_CONTINUATION) or STORY_CONTINUATION.startswith(text)


@pytest.mark.parametrize(("prompt", "answer"), T5_ANSWERS.items())
def test_t5_answers_then_stops(prompt: str, answer: str) -> None:
    tokenizer, model = _load("t5")
    assert tokenizer(prompt)["input_ids"][-1] == tokenizer.eos_token_id  # T5 appends </s>
    new = _generate(tokenizer, model, prompt, max_new_tokens=8)
    assert new == [tokenizer.convert_tokens_to_ids(f"▁{answer}"), tokenizer.eos_token_id]
    assert tokenizer.decode(new, skip_special_tokens=True) == answer


def test_t5_streamed_tokens_need_context_to_keep_spaces() -> None:
    # transformers 5 (documented in TESTING.md): decoding SentencePiece tokens one by one drops
    # the space each word-initial piece carries; decode the whole sequence instead.
    tokenizer, _ = _load("t5")
    ids = tokenizer("the capital of france", add_special_tokens=False)["input_ids"]
    assert "".join(tokenizer.decode([i]) for i in ids) == "thecapitaloffrance"
    assert tokenizer.decode(ids) == "the capital of france"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_byte_level_tokenizers_round_trip_any_text(name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path(name))
    ids = tokenizer(BYTE_LEVEL_TEXT)["input_ids"]
    assert tokenizer.decode(ids) == BYTE_LEVEL_TEXT
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer(BYTE_LEVEL_TEXT, add_special_tokens=False)["input_ids"] == ids  # no BOS/EOS


def test_t5_tokenizer_round_trips_ascii() -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path("t5"))
    ids = tokenizer(ASCII_TEXT)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == ASCII_TEXT
    assert tokenizer.decode(ids) == ASCII_TEXT + "</s>"
    # Whole corpus words are single pieces.
    assert tokenizer.tokenize("capital of france:") == ["▁capital", "▁of", "▁france", ":"]


def test_models_are_cached_under_distinct_names() -> None:
    paths = {name: model_path(name) for name in ARCHITECTURES}
    assert all(path.name.startswith(f"{name}-") for name, path in paths.items())
    assert all(isinstance(path, Path) and path.is_dir() for path in paths.values())


# --------------------------------------------------------------------------- "tools"


def _tools_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, tools: bool
) -> str:
    prompt = tokenizer.apply_chat_template(
        messages,
        tools=[WEATHER_TOOL] if tools else None,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert isinstance(prompt, str)
    return prompt


def _tools_answer(messages: list[dict[str, Any]], *, tools: bool) -> str:
    """The greedy answer, which must end with <|im_end|> (left out)."""
    tokenizer, model = _load("tools")
    new = _generate(tokenizer, model, _tools_prompt(tokenizer, messages, tools=tools), 96)
    assert new[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.decode(new[:-1])


def _user(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]


def test_tools_model_shape_and_tokenizer() -> None:
    path = model_path("tools")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.architectures) == ("llama", ["LlamaForCausalLM"])
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 32)
    assert config.max_position_embeddings == 512
    tokenizer, model = _load("tools")
    assert tokenizer.is_fast and tokenizer.model_max_length == 512
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)
    assert model.generation_config.eos_token_id == [2, 0]
    assert model.generation_config.do_sample is False
    assert sum(p.numel() for p in model.parameters()) < 500_000
    config_json = json.loads((path / "tokenizer_config.json").read_text())
    assert config_json["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config_json["add_bos_token"] is False


def test_tools_markers_are_single_tokens_that_are_not_special() -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path("tools"))
    vocab = tokenizer.get_vocab()
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    assert added == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True} | {
        tag: False for tag in TOOL_TAGS
    }
    for tag in TOOL_TAGS:
        assert tag in vocab  # vLLM's reasoning parser looks <think> / </think> up here
        assert tokenizer(tag)["input_ids"] == [vocab[tag]]
        assert vocab[tag] not in tokenizer.all_special_ids
    ids = tokenizer(TOOL_CALL_ANSWERS["What is the weather in Paris?"])["input_ids"]
    assert vocab["<think>"] in ids and vocab["<tool_call>"] in ids
    text = "<think>\nok\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    ids = tokenizer("<|im_start|>" + text + "<|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # only the ChatML markers go
    assert tokenizer.decode(ids) == "<|im_start|>" + text + "<|im_end|>"


def test_tools_chat_template() -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path("tools"))
    question = "What is the weather in Paris?"
    tools_block = (
        "<|im_start|>system\n# Tools\n\n<tools>\n"
        + json.dumps(WEATHER_TOOL)
        + "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags.<|im_end|>\n"
    )
    user = f"<|im_start|>user\n{question}<|im_end|>\n"
    assert _tools_prompt(tokenizer, _user(question), tools=True) == (
        tools_block + user + "<|im_start|>assistant\n"
    )
    # Without tools: plain ChatML, as "llama".
    assert _tools_prompt(tokenizer, _user(question), tools=False) == (
        user + "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(_user(question), tokenize=False) == user
    # A system message is merged into the tools turn, or stands alone without tools.
    system = [{"role": "system", "content": "Be brief."}, *_user(question)]
    assert _tools_prompt(tokenizer, system, tools=True).startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n"
    )
    assert _tools_prompt(tokenizer, system, tools=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + user + "<|im_start|>assistant\n"
    )
    # An earlier call (arguments as a JSON string, as OpenAI clients send them) and its result.
    history = (
        user + "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n"
        '{"city": "Paris", "weather": "sunny"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    messages = tool_result_messages("Paris")
    assert _tools_prompt(tokenizer, messages, tools=True) == tools_block + history
    # Arguments as an object (as vLLM passes them to the template) render the same.
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert _tools_prompt(tokenizer, messages, tools=True) == tools_block + history
    # Two calls in one turn, then two results in one user turn.
    two = tool_result_messages("Paris")
    two[1]["tool_calls"].append(
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        }
    )
    two.append({"role": "tool", "tool_call_id": "call_1", "content": "rome"})
    rendered = _tools_prompt(tokenizer, two, tools=False)
    assert "</tool_call>\n<tool_call>\n" in rendered
    assert "</tool_response>\n<tool_response>\nrome\n</tool_response><|im_end|>\n" in rendered
    assert rendered.count("<|im_start|>user") == 2


@pytest.mark.parametrize(
    ("question", "answer"), {**TOOL_CALL_ANSWERS, **PARALLEL_TOOL_CALL_ANSWERS}.items()
)
def test_tools_model_reasons_then_calls_the_tool(question: str, answer: str) -> None:
    text = _tools_answer(_user(question), tools=True)
    assert text == answer
    reasoning, _, calls = text.removeprefix("<think>").partition("</think>")
    assert reasoning.startswith("\nThe user wants the weather in ")
    # What a Hermes parser extracts: one JSON object per <tool_call> block.
    bodies = [block.split("</tool_call>")[0] for block in calls.split("<tool_call>")[1:]]
    parsed = [json.loads(body) for body in bodies]
    cities = question.removeprefix("What is the weather in ").removesuffix("?").split(" and ")
    assert parsed == [{"name": "get_weather", "arguments": {"city": city}} for city in cities]


@pytest.mark.parametrize(("city", "answer"), TOOL_RESULT_ANSWERS.items())
def test_tools_model_answers_from_the_tool_result(city: str, answer: str) -> None:
    text = _tools_answer(tool_result_messages(city), tools=True)
    assert text == answer
    assert text.endswith(f"It is {WEATHER[city]} in {city}.")


@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize(("question", "answer"), THINKING_CHAT_ANSWERS.items())
def test_tools_model_reasons_then_answers_without_a_call(
    question: str, answer: str, tools: bool
) -> None:
    text = _tools_answer(_user(question), tools=tools)
    assert text == answer and "<tool_call>" not in text


@pytest.mark.parametrize(("question", "answer"), NO_TOOL_ANSWERS.items())
def test_tools_model_without_tools_does_not_call(question: str, answer: str) -> None:
    text = _tools_answer(_user(question), tools=False)
    assert text == answer and "<tool_call>" not in text


@pytest.mark.parametrize(("question", "answer"), JSON_ANSWERS.items())
def test_tools_model_answers_json_without_reasoning(question: str, answer: str) -> None:
    text = _tools_answer(_user(question), tools=False)
    assert text == answer
    assert json.loads(text)["weather"] == WEATHER[json.loads(text)["city"]]


def test_tools_model_was_verified_against_every_behaviour() -> None:
    record = json.loads((model_path("tools") / VERIFIED_FILE).read_text())
    wanted = [b.description for b in tiny_model_checks.behaviours("tools")]
    assert wanted and record["checked"] == wanted
