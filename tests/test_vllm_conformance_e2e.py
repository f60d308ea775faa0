"""Differential conformance: the same requests to vLLM's own OpenAI server and to
``lmserve serve --backend vllm`` on the same tiny model, compared field by field after dropping
ids and timestamps (text, token counts, finish and stop reasons, logprobs within 1e-3).

vLLM 0.32's server is the reference for every field and response shape (issue 17). The module
prints the match rate; every request must match.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from _support.conformance import Case, compare
from _support.servers import ServerProcess
from _support.tiny_models import model_path

pytestmark = pytest.mark.slow
Pool = Callable[..., ServerProcess]

PROMPT = "the capital of france is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CONTINUE = [*FRANCE, {"role": "assistant", "content": "Par"}]
TOLERANCE = 1e-3

CASES: list[Case] = [
    ("completions", {"prompt": PROMPT, "max_tokens": 12}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "min_tokens": 6}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "stop": ["."]}),
    ("completions", {"prompt": PROMPT, "max_tokens": 12, "stop": ["."],
                     "include_stop_str_in_output": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "stop_token_ids": [16]}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "logprobs": 3}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 2}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "prompt_logprobs": 2, "no_stream": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "truncate_prompt_tokens": 3,
                     "truncation_side": "left"}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "truncate_prompt_tokens": 3}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "n": 2}),  # greedy n > 1: refused
    ("completions", {"prompt": [PROMPT, "the capital of italy is"], "max_tokens": 6}),
    ("completions", {"prompt": [262, 270, 269, 321, 272], "max_tokens": 6}),
    ("completions", {"prompt": PROMPT, "max_tokens": 4, "logprobs": 1,
                     "return_tokens_as_token_ids": True}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True,
                     "skip_special_tokens": False}),
    ("completions", {"prompt": PROMPT, "max_tokens": 6, "request_id": "conformance-1"}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "logprobs": True,
                          "top_logprobs": 2}),
    ("chat/completions", {"messages": FRANCE, "max_completion_tokens": 2}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "min_tokens": 5}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 10, "stop": ["is"],
                          "include_stop_str_in_output": True}),
    ("chat/completions", {"messages": CONTINUE, "max_tokens": 6, "add_generation_prompt": False,
                          "continue_final_message": True, "echo": True}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "prompt_logprobs": 1,
                          "no_stream": True}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "n": 2}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 8, "ignore_eos": True,
                          "skip_special_tokens": False}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "request_id": "conformance-2"}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 6, "logprobs": True,
                          "return_tokens_as_token_ids": True}),
    # Structured outputs, with no reasoning parser (test_vllm_conformance_tools_e2e has one).
    ("completions", {"prompt": PROMPT, "max_tokens": 8,
                     "structured_outputs": {"choice": [" rome.", " madrid."]}}),
    ("completions", {"prompt": PROMPT, "max_tokens": 8, "logprobs": 2,
                     "structured_outputs": {"regex": " [a-z]+ [a-z]+"}}),
    ("completions", {"prompt": PROMPT, "max_tokens": 20, "structured_outputs": {
        "json": {"type": "object", "properties": {"city": {"type": "string"}},
                 "required": ["city"], "additionalProperties": False}}}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 12, "logprobs": True,
                          "top_logprobs": 2, "structured_outputs": {"grammar":
                          'root ::= "The answer is " ("Paris" | "Rome") "."'}}),
    ("chat/completions", {"messages": FRANCE, "max_tokens": 12,
                          "response_format": {"type": "json_schema", "json_schema": {
                              "name": "city", "schema": {"type": "string", "enum": ["Rome", "Oslo"]}}}}),
]  # fmt: skip


def test_lmserve_on_vllm_answers_as_vllms_own_server(
    llama_reference: ServerProcess, server_pool: Pool
) -> None:
    ours = server_pool("--model_dir", str(model_path("llama")), "--backend", "vllm",
                       "--kv-cache-memory-bytes", str(512 * 2**20))  # fmt: skip
    mismatches = compare(CASES, llama_reference, ours, TOLERANCE)
    assert mismatches == [], "\n".join(mismatches)


def test_lmserve_on_huggingface_answers_as_vllms_own_server(
    llama_reference: ServerProcess, server_pool: Pool
) -> None:
    """The same requests on the Hugging Face backend: the same text, token counts, reasons and
    shapes; logprobs within 2e-3 (another kernel, the same float32 weights)."""
    ours = server_pool("--model_dir", str(model_path("llama")), "--backend", "huggingface")
    mismatches = compare(CASES, llama_reference, ours, 2e-3)
    assert mismatches == [], "\n".join(mismatches)
