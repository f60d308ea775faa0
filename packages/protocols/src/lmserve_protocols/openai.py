"""OpenAI-compatible schemas: completions, chat completions and their stream chunks, embeddings,
model listing and the error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmserve_protocols.wire import omitted_when_none


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIErrorResponse(BaseModel):
    """The body of every OpenAI-route error: ``{"error": {"message", "type", ...}}``."""

    error: OpenAIErrorDetail


class EmbeddingRequest(BaseModel):
    """``POST /openai/v1/embeddings``: text(s) or token ids to embed (OpenAI's fields, vLLM's
    extensions, and TEI's ``normalize`` / ``truncate``)."""

    # Unknown fields are kept so the server can refuse vLLM's unimplemented ones by name (and
    # tolerate what OpenAI SDKs add over time).
    model_config = ConfigDict(extra="allow")

    model: str | None = None  # vLLM: the served model when left out
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    # Matryoshka models: the first ``dimensions`` values, normalised again.
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    request_id: str | None = None
    add_special_tokens: bool = True
    # vLLM: keep this many tokens of each input (-1: the model's maximum), cut on
    # ``truncation_side`` (default: the tokenizer's side, special tokens kept).
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    # vLLM: false returns the pooled vector unnormalised (TEI spells it ``normalize``).
    use_activation: bool | None = None
    # Byte order of ``base64`` floats (native is little-endian on every platform lmserve runs).
    endianness: Literal["native", "big", "little"] = "native"
    # TEI: ``normalize`` false as ``use_activation`` false; ``truncate`` false refuses an input
    # longer than the model takes (a 400) where lmserve otherwise truncates it.
    normalize: bool | None = None
    truncate: bool | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The embeddings, one per input, in input order, with token usage."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmserve"
    # vLLM's: the weights' source (the base model's id or folder, an adapter's path) and, for
    # a LoRA adapter, the base model it runs on (null for the base model itself).
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /openai/v1/load_lora_adapter`` (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    # Replace the weights of an adapter already served under this name.
    load_inplace: bool = False
    # vLLM's flag for 3D-packed MoE adapter weights; refused when true (no MoE adapters here).
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /openai/v1/unload_lora_adapter`` (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    # When given, the adapter's engine id must match (ModelCard-less clients track it).
    lora_int_id: int | None = None


class ModelList(BaseModel):
    """``GET /openai/v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- Completions and Chat ---------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    # vLLM: with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: bool = False


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs``: exactly one constraint (json, regex, choice, grammar,
    json_object or structural_tag) and its options."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema and its name (``strict`` as OpenAI's: the
    output always matches the schema here, strict or not, as in vLLM)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: text, json_object, json_schema, or vLLM's structural_tag (its other
    fields: ``format``, or the legacy ``structures`` and ``triggers``)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat; vLLM's extensions included."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    # vLLM's extensions, with vLLM's meaning.
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    # The response id becomes ``cmpl-``/``chatcmpl-`` + this (an X-Request-Id header wins).
    request_id: str | None = None
    # Lower runs first, with --scheduling_policy priority (an X-Vllm-Priority header wins).
    priority: int = 0
    # Top-k log probabilities of each prompt token (-1: the whole vocabulary); not in streams.
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    # Logprob tokens as "token_id:N" (None: the server's --return_tokens_as_token_ids).
    return_tokens_as_token_ids: bool | None = None
    # The output must match these (response_format overrides them, as in vLLM).
    structured_outputs: StructuredOutputsParams | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    """``POST /openai/v1/completions``: a prompt (text, texts or token ids) to continue."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ChatCompletionTool(BaseModel):
    """One entry of ``tools``: a function the model may call."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function to call."""

    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCallParam(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallParam(BaseModel):
    """A tool call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    """One message of a chat: ``role`` and ``content`` (text or content parts); assistant
    messages may carry ``tool_calls``, and ``role: "tool"`` messages the ``tool_call_id`` they
    answer."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, object]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    # vLLM passes an assistant message's earlier reasoning on to the template.
    reasoning: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /openai/v1/chat/completions``: messages, rendered by the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, object] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    # Echo the last message when it is the assistant's (vLLM).
    echo: bool = False
    tools: list[ChatCompletionTool] | None = None
    # None: "auto" with tools, "none" without (vLLM's default).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # With --enable_prompt_tokens_details and some prompt tokens cached (vLLM's rule).
    prompt_tokens_details: PromptTokensDetails | None = omitted_when_none()


# --- Completions and Chat responses (the shapes of vLLM 0.32's OpenAI server) --------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """Completions' legacy logprobs: parallel lists, one entry per token (echoed prompt first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entry for one candidate token of one prompt position."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token at that position
    decoded_token: str | None = None


# One entry per prompt token (None for the first, which nothing precedes): the prompt token and
# the top-k candidates, keyed by token id.
PromptLogprobs = list[dict[int, PromptLogprob] | None]

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended the choice (None: EOS, length, not yet).
    stop_reason: int | str | None = None


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    """``POST /openai/v1/completions`` without streaming."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (``choices`` empty in the usage chunk,
    the only one that carries ``usage``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = omitted_when_none()


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


def _is_empty(value: list[Any]) -> bool:
    return not value


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"  # --response_role
    content: str | None = None
    # The model's reasoning (with --reasoning-parser), as vLLM 0.32 names it.
    reasoning: str | None = None
    # vLLM leaves the key out when no tool was called.
    tool_calls: list[ToolCall] = Field(default_factory=list, exclude_if=_is_empty)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """``POST /openai/v1/chat/completions`` without streaming."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = omitted_when_none()
    arguments: str | None = omitted_when_none()


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: ``id``, ``type`` and ``name`` come in its first piece,
    argument fragments after."""

    index: int
    id: str | None = omitted_when_none()
    type: Literal["function"] | None = omitted_when_none()
    function: DeltaFunctionCall | None = omitted_when_none()


class ChatDelta(BaseModel):
    """What a chunk adds to one choice: the role in the first, text after, ``{}`` at the end."""

    role: str | None = omitted_when_none()
    content: str | None = omitted_when_none()
    reasoning: str | None = omitted_when_none()
    tool_calls: list[DeltaToolCall] | None = omitted_when_none()


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``choices`` empty in the usage
    chunk, the only one that carries ``usage``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = omitted_when_none()
