"""vLLM's ``/tokenize`` and ``/detokenize`` over a served model's own tokenizer, for every task.

Nothing here runs the model or takes an admission slot: a client counts tokens before it sends.
A generative model tokenizes a ``prompt`` as a completion does and renders ``messages`` through
``prepare_chat``, the very code chat completions run (template, kwargs, tools, content format,
``--trust_request_chat_template``), so the ids are the prompt a chat completion would get.
An encoder model tokenizes a ``prompt`` with its own tokenizer; it has no chat template, so the
chat form is refused. A prompt longer than the context is counted, not refused (as in vLLM).
Unlike vLLM, ``/detokenize`` refuses ids outside the vocabulary, which vLLM decodes to nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from lmserve_core.encoder.service import INLINE_TOKENIZE_CHARS, EncoderService
from lmserve_core.errors import InvalidInput
from lmserve_core.generation.prepare import prepare_chat
from lmserve_core.generation.request_fields import refuse_unimplemented
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_protocols.openai import ChatCompletionRequest
from lmserve_protocols.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

__all__ = [
    "EncoderTokenizing",
    "GeneratorTokenizing",
    "Tokenizing",
    "detokenize",
    "tokenize",
]

# Up to this many ids decode on the event loop (well under a millisecond); more go to a thread.
INLINE_DETOKENIZE_TOKENS = 1024
# prepare_chat checks prompt + max_tokens against the context; /tokenize counts whatever comes.
_UNBOUNDED_CONTEXT = 2**62

T = TypeVar("T")


class Tokenizing(Protocol):
    """What /tokenize and /detokenize need from one served model."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_bound(self) -> int | None:
        """Token ids must be below this (None: unknown)."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def render_chat(self, req: TokenizeChatRequest, model: str) -> list[int]:
        """The prompt ids a chat completion with these messages would get."""
        ...

    def token_strs(self, ids: Sequence[int]) -> list[str]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included (vLLM's detokenize)."""
        ...


def _max_token_id(tokenizer: object) -> int | None:
    """The tokenizer's largest id (lmserve's adapters have it; other tokenizers may not)."""
    value = getattr(tokenizer, "max_token_id", None)
    return value if isinstance(value, int) else None


def _bound(model_vocab: int | None, tokenizer: object) -> int | None:
    """vLLM's bound: the larger of the model's vocabulary and the tokenizer's (a model may have
    rows no token uses; a tokenizer may have tokens the model has no row for)."""
    top = _max_token_id(tokenizer)
    sizes = [s for s in (model_vocab, None if top is None else top + 1) if s is not None]
    return max(sizes) if sizes else None


class GeneratorTokenizing:
    """A generative model (either backend): its OpenAI layer's tokenizer and chat rendering."""

    def __init__(self, service: OpenAIGenerationService) -> None:
        self._service = service
        self._tok = service.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._service.facts.max_model_len

    @property
    def vocab_bound(self) -> int | None:
        return _bound(self._service.facts.vocab_size, self._tok)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, req: TokenizeChatRequest, model: str) -> list[int]:
        service = self._service
        chat = ChatCompletionRequest(
            model=model, messages=req.messages, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=req.add_special_tokens, chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs, tools=req.tools,
            # Nothing is generated: no tool-choice checks, and the tools always reach the
            # template (vLLM's tokenize passes them whatever --exclude-tools-when-tool-choice-none).
            tool_choice="none", max_tokens=0,
        )  # fmt: skip
        prepared = prepare_chat(
            chat, self._tok, replace(service.facts, max_model_len=_UNBOUNDED_CONTEXT),
            service.limits, trust_request_template=service.trust_request_chat_template,
            frontend=replace(service.options, exclude_tools_when_tool_choice_none=False),
        )  # fmt: skip
        return list(prepared.prompts[0].ids)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class EncoderTokenizing:
    """An encoder model (classification, NER, fill-mask, embeddings): the tokenizer its requests
    are encoded with, without truncation."""

    def __init__(self, service: EncoderService, model_name: str) -> None:
        self._service = service
        self._tok = service.tokenizer
        self._name = model_name

    @property
    def max_model_len(self) -> int:
        return self._service.info.max_length

    @property
    def vocab_bound(self) -> int | None:
        return _bound(self._service.info.vocab_size, self._tok)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        (encoding,) = self._tok.encode_batch(
            [text], add_special_tokens=add_special_tokens, max_length=None
        )
        return list(encoding.ids)

    def render_chat(self, req: TokenizeChatRequest, model: str) -> list[int]:
        raise InvalidInput(
            f"model {self._name!r} serves {self._service.task.value} and has no chat template: "
            "/tokenize takes its 'prompt' form, not 'messages'", param="messages",
        )  # fmt: skip

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


async def _run(work: Callable[[], T], *, inline: bool) -> T:
    """Short work on the event loop, long work in a thread (the loop keeps serving)."""
    return work() if inline else await asyncio.to_thread(work)


def _chat_chars(req: TokenizeChatRequest) -> int:
    total = 0
    for message in req.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(str(part.get("text", ""))) for part in content)
    return total


async def tokenize(
    target: Tokenizing, req: TokenizeCompletionRequest | TokenizeChatRequest, model: str
) -> TokenizeResponse:
    """vLLM's ``/tokenize``: ``model`` is the served name the request reached."""

    def ids_and_strs(ids: list[int]) -> tuple[list[int], list[str] | None]:
        return ids, target.token_strs(ids) if req.return_token_strs else None

    if isinstance(req, TokenizeChatRequest):
        refuse_unimplemented("tokenize_chat", req.model_extra)
        chat = req
        ids, strs = await _run(
            lambda: ids_and_strs(target.render_chat(chat, model)),
            inline=_chat_chars(chat) <= INLINE_TOKENIZE_CHARS,
        )
    else:
        refuse_unimplemented("tokenize_completion", req.model_extra)
        prompt, special = req.prompt, req.add_special_tokens
        ids, strs = await _run(
            lambda: ids_and_strs(target.encode(prompt, add_special_tokens=special)),
            inline=len(prompt) <= INLINE_TOKENIZE_CHARS,
        )
    return TokenizeResponse(
        count=len(ids), max_model_len=target.max_model_len, tokens=ids, token_strs=strs
    )


async def detokenize(target: Tokenizing, req: DetokenizeRequest) -> DetokenizeResponse:
    """vLLM's ``/detokenize``; ids outside the vocabulary are a 400 naming the first."""
    refuse_unimplemented("detokenize", req.model_extra)
    tokens = req.tokens
    bound = target.vocab_bound
    if bound is not None:
        outside = next((t for t in tokens if t >= bound), None)
        if outside is not None:
            raise InvalidInput(
                f"Token id {outside} is out of vocabulary (ids are below {bound})",
                param="tokens",
            )

    def decode() -> str:
        try:
            return target.decode(tokens)
        except (OverflowError, ValueError) as exc:  # an id the tokenizer cannot even hold
            raise InvalidInput(f"cannot decode these token ids: {exc}", param="tokens") from None

    text = await _run(decode, inline=len(tokens) <= INLINE_DETOKENIZE_TOKENS)
    return DetokenizeResponse(prompt=text)
