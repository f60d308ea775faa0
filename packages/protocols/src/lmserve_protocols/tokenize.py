"""vLLM's ``/tokenize`` and ``/detokenize`` bodies (vLLM 0.32's
``vllm.entrypoints.serve.tokenize.protocol``): the same fields, defaults and response shapes.

``/tokenize`` takes either form: a ``prompt`` (TokenizeCompletionRequest) or ``messages``
rendered by the chat template (TokenizeChatRequest); a body with ``messages`` is the chat form,
as vLLM's union resolves it. Unknown fields are accepted (as vLLM's); the vLLM fields lmserve
does not implement are refused by lmserve_core (``generation.request_fields``) when set.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from lmserve_protocols.openai import ChatCompletionTool, ChatMessage


class TokenizeCompletionRequest(BaseModel):
    """``POST /tokenize`` with a ``prompt``: its token ids as a completion would see them."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the served model
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """``POST /tokenize`` with ``messages``: the prompt token ids of a chat completion (the same
    template, kwargs and tools)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    # The template writes BOS itself where the model wants one.
    add_special_tokens: bool = False
    # Only with --trust_request_chat_template, as on chat completions.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, object] | None = None
    tools: list[ChatCompletionTool] | None = None


def _tokenize_form(body: Any) -> str:
    if isinstance(body, dict):
        return "chat" if "messages" in body else "completion"
    return "chat" if isinstance(body, TokenizeChatRequest) else "completion"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion")]
    | Annotated[TokenizeChatRequest, Tag("chat")],
    Discriminator(_tokenize_form),
]


class TokenizeResponse(BaseModel):
    """The token ids, their count and the model's context length; ``token_strs`` (the tokens'
    vocabulary entries) only when asked for, ``null`` otherwise, as vLLM sends it."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids to text (special tokens kept)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str
