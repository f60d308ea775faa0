"""Fields of vLLM's chat and completion requests that lmserve does not implement.

vLLM 0.32's OpenAI server is the reference for every request field. A field lmserve implements
is declared on its request model (lmserve_protocols.openai); every other vLLM field is listed
here with vLLM's default, and a request that sets one to anything else is refused with a 400
that names it: a field is implemented or refused, never accepted and ignored. Fields of no API
at all are still accepted, as OpenAI does. ``tests/test_request_fields.py`` checks this table
against the vLLM installed with the tests, so a new vLLM field cannot slip through unnoticed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmserve_core.errors import InvalidInput

_COMMON: dict[str, Any] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "watermarking": None,
    "allowed_token_ids": None,
    "bad_words": [],
    "logprob_token_ids": None,
    "session_id": None,
    "return_token_ids": None,
    "return_token_offsets": False,
    "routed_experts_prompt_start": 0,
    "mm_payload": "tensors",
    "return_mm_kwargs": None,
    "cache_salt": None,
    "kv_transfer_params": None,
    "ec_transfer_params": None,
    "vllm_xargs": None,
    "repetition_detection": None,
    "thinking_token_budget": None,
    "stream_interval": None,
}

_POOLING: dict[str, Any] = {
    "padding": None,
    "priority": 0,
    "mm_processor_kwargs": None,
    "cache_salt": None,
}
_SCORING: dict[str, Any] = {
    "truncation_side": None,  # a pair is cut document first
    "max_tokens_per_query": 0,
    "max_tokens_per_doc": 0,
    "instruction": None,
    "chat_template_kwargs": None,
}

NOT_IMPLEMENTED: dict[str, dict[str, Any]] = {
    "chat": {
        **_COMMON,
        "media_io_kwargs": None,
        "mm_processor_kwargs": None,
        "return_prompt_text": None,
    },
    "completion": {
        **_COMMON,
        "prompt_embeds": None,
    },
    # /tokenize and /detokenize (lmserve_protocols.tokenize): text only, no media.
    "tokenize_completion": {},
    "tokenize_chat": {
        "media_io_kwargs": None,
        "mm_processor_kwargs": None,
    },
    "detokenize": {},
    # Embeddings, rerank and score (lmserve_protocols.openai / .scoring): no media, no
    # prompt-level padding, no priority scheduling or prefix cache in the encoder batcher.
    "embedding": {**_POOLING, "embed_dtype": "float32"},
    "rerank": {**_POOLING, **_SCORING},
    "score": {**_POOLING, **_SCORING},
}


def refuse_unimplemented(kind: str, extra: Mapping[str, Any] | None) -> None:
    """Raise InvalidInput for the first vLLM field in ``extra`` (the request's undeclared
    fields) that lmserve does not implement and that is set to other than vLLM's default."""
    table = NOT_IMPLEMENTED[kind]
    for name, value in (extra or {}).items():
        if name in table and value != table[name]:
            raise InvalidInput(
                f"{name!r} is not supported by lmserve (vLLM's default is {table[name]!r})",
                param=name,
            )
