"""Validate OpenAI completion/chat requests and turn them into backend requests.

Everything a client can get wrong is caught here, before any token is generated, and
raised as InvalidInput with the offending ``param`` (→ 400 with the OpenAI error body).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lmserve_core.errors import InvalidInput
from lmserve_core.generation.backend import GenerationTokenizer
from lmserve_core.generation.output_parsing import (
    OutputParsing,
    RequestParsing,
    ToolMode,
    tool_mode,
)
from lmserve_core.generation.params import ReasoningGate, SamplingParams, StructuredOutput
from lmserve_core.generation.request_fields import refuse_unimplemented
from lmserve_core.generation.structured import structured_output
from lmserve_core.lora import LoRAAdapter
from lmserve_protocols.openai import ChatCompletionRequest, CompletionRequest

CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class GenerationLimits:
    """Per-request caps; each violation is a 400 that names the limit."""

    max_n: int = 16
    max_stop: int = 16
    max_logprobs: int = 20  # -1: up to the vocabulary (vLLM's --max-logprobs)
    priority_scheduling: bool = False  # --scheduling_policy priority
    max_prompts: int = 64


@dataclass(frozen=True)
class FrontendOptions:
    """Server-wide choices of vLLM's OpenAI server flags (the same names, on both backends)."""

    response_role: str = "assistant"
    force_include_usage: bool = False
    prompt_tokens_details: bool = False
    tokens_as_ids: bool = False
    content_format: Literal["auto", "string", "openai"] = "auto"
    # --tool-call-parser / --enable-auto-tool-choice / --exclude-tools-when-tool-choice-none
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    exclude_tools_when_tool_choice_none: bool = False


@dataclass(frozen=True)
class ModelFacts:
    max_model_len: int
    vocab_size: int
    is_encoder_decoder: bool
    # Sampling defaults from the model's generation_config (vLLM's `auto`).
    default_sampling: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptInput:
    ids: list[int]
    text: str  # for echo


@dataclass(frozen=True)
class RequestHeaders:
    """What vLLM's server reads from a generation request's HTTP headers."""

    request_id: str | None = None  # X-Request-Id: the response id becomes cmpl-/chatcmpl-<it>
    priority: str | None = None  # X-Vllm-Priority: replaces the body's priority when an integer


@dataclass(frozen=True)
class TextOptions:
    """How generated tokens become text (vLLM's detokenization fields)."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False


@dataclass(frozen=True)
class Prepared:
    kind: Literal["completion", "chat"]
    request_id: str
    created: int
    model: str
    prompts: list[PromptInput]
    n: int
    params: SamplingParams
    stops: list[str]
    echo: bool
    stream: bool
    include_usage: bool
    logprobs: int | None  # completions: k alternatives; chat: top_logprobs (0 = only chosen)
    # With include_usage: the usage so far in every chunk.
    continuous_usage: bool = False
    text: TextOptions = field(default_factory=TextOptions)
    # Chat with echo: the last message's content when its role is --response_role's (vLLM's).
    echo_text: str = ""
    priority: int = 0
    # prompt_logprobs: top-k per prompt token to return (None: not asked).
    prompt_logprobs: int | None = None
    role: str = "assistant"  # of chat messages (--response_role)
    tokens_as_ids: bool = False  # logprob tokens as "token_id:N"
    prompt_tokens_details: bool = False  # usage.prompt_tokens_details (cached tokens)
    # The request field the output constraint came from (names it in compile errors).
    structured_source: str = "structured_outputs"
    # Chat: how the output splits into reasoning, content and tool calls (None: all content).
    parsing: RequestParsing | None = None
    tool_mode: ToolMode = "none"
    parallel_tool_calls: bool = True
    include_reasoning: bool = True
    # With a constraint and a reasoning parser: a gate per sequence (the constraint starts where
    # the reasoning ends, as in vLLM).
    reasoning_gates: Callable[[], ReasoningGate | None] | None = None
    # The LoRA adapter 'model' named (None: the base model), and the served name metrics use
    # (the adapter's, or the base model's primary name whatever alias was asked for).
    adapter: LoRAAdapter | None = None
    served_name: str | None = None

    @property
    def chat_logprobs_shown(self) -> bool:
        """Chat logprobs go out when asked for, unless a parser hides the reasoning: vLLM leaves
        them out then (they would spell the reasoning out)."""
        return self.logprobs is not None and (self.parsing is None or self.include_reasoning)

    def choice_params(self, choice: int) -> SamplingParams:
        """n > 1 with a seed: each choice reproducible, and different from the others."""
        if self.params.seed is None or choice == 0:
            return self.params
        return replace(self.params, seed=self.params.seed + choice)


def _stops(value: str | list[str] | None, limits: GenerationLimits) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > limits.max_stop:
        raise InvalidInput(f"at most {limits.max_stop} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise InvalidInput("stop sequences must not be empty", param="stop")
    return stops


def _logit_bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidInput(
                f"logit_bias key {key!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < vocab:
            raise InvalidInput(
                f"logit_bias token id {token} is outside [0, {vocab})", param="logit_bias"
            )
        if not -100 <= value <= 100:
            raise InvalidInput("logit_bias values must be in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    facts: ModelFacts,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    structured: StructuredOutput | None = None,
) -> SamplingParams:
    d = facts.default_sampling
    temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else d.get("top_p", 1.0)
    top_k = req.top_k if req.top_k is not None else int(d.get("top_k", 0))
    if float(temperature) == 0.0 and req.n > 1:
        # n greedy choices would be n copies of one: vLLM refuses them.
        raise InvalidInput(f"n must be 1 when using greedy sampling, got {req.n}.", param="n")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise InvalidInput("seed must fit in 64 bits", param="seed")
    for token in req.stop_token_ids or []:
        if not 0 <= token < facts.vocab_size:
            raise InvalidInput(f"stop_token_ids: {token} is not a token id", param="stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=0 if top_k in (-1, 0) else int(top_k),
        min_p=float(req.min_p or 0.0),
        seed=req.seed,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(
            req.repetition_penalty
            if req.repetition_penalty is not None
            else d.get("repetition_penalty", 1.0)
        ),
        logit_bias=_logit_bias(req.logit_bias, facts.vocab_size),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        min_tokens=min(req.min_tokens, max_tokens),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=structured,
    )


def _check_common(
    kind: Literal["completion", "chat"],
    req: CompletionRequest | ChatCompletionRequest,
    limits: GenerationLimits,
) -> None:
    refuse_unimplemented(kind, req.model_extra)
    if req.n > limits.max_n:
        raise InvalidInput(f"n must be at most {limits.max_n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise InvalidInput(
            "stream_options is only allowed with stream: true", param="stream_options"
        )


def _check_logprobs(
    requested: int | None, limits: GenerationLimits, facts: ModelFacts, param: str
) -> None:
    cap = facts.vocab_size if limits.max_logprobs < 0 else limits.max_logprobs
    if requested is not None and requested > cap:
        raise InvalidInput(f"{param} must be at most {cap} (--max_logprobs)", param=param)


def _max_tokens(
    requested: int | None, prompt_len: int, facts: ModelFacts, *, default_rest: bool
) -> int:
    """The limit of docs/behaviour.md §5: prompt + max_tokens must fit the context."""
    limit = facts.max_model_len
    if facts.is_encoder_decoder:
        if prompt_len > limit:
            raise InvalidInput(
                f"This model's maximum input length is {limit} tokens; the prompt has {prompt_len}",
                param="prompt",
            )
        if requested is not None and requested > limit:
            raise InvalidInput(
                f"max_tokens {requested} exceeds this model's maximum output length of {limit}",
                param="max_tokens",
            )
        return requested if requested is not None else limit
    room = limit - prompt_len
    if room <= 0 and (requested is None or requested > 0):
        raise InvalidInput(
            f"This model's maximum context length is {limit} tokens; the prompt alone has "
            f"{prompt_len}", param="messages" if default_rest else "prompt",
        )  # fmt: skip
    if requested is None:
        return room
    if requested > room:
        raise InvalidInput(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested


def _response_id(
    prefix: str, headers: RequestHeaders, req: CompletionRequest | ChatCompletionRequest
) -> str:
    """vLLM's: an ``X-Request-Id`` header, else the request's ``request_id``, else random."""
    return f"{prefix}-{headers.request_id or req.request_id or uuid.uuid4().hex}"


def _priority(
    req: CompletionRequest | ChatCompletionRequest,
    headers: RequestHeaders,
    limits: GenerationLimits,
) -> int:
    priority = req.priority
    if headers.priority is not None:
        with contextlib.suppress(ValueError):  # not an integer: vLLM keeps the body's
            priority = int(headers.priority)
    if priority != 0 and not limits.priority_scheduling:
        # vLLM would take it and schedule first come, first served anyway: lmserve says so.
        raise InvalidInput(
            "'priority' needs priority scheduling; this server runs first come, first served "
            "(start it with --scheduling_policy priority)", param="priority",
        )  # fmt: skip
    return priority


def _prompt_logprobs(
    req: CompletionRequest | ChatCompletionRequest, limits: GenerationLimits, facts: ModelFacts
) -> int | None:
    requested = req.prompt_logprobs
    if requested is None:
        return None
    if req.stream and requested != 0:
        raise InvalidInput(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    k = facts.vocab_size if requested == -1 else requested
    _check_logprobs(k, limits, facts, "prompt_logprobs")
    return k


def _text_options(req: CompletionRequest | ChatCompletionRequest) -> TextOptions:
    return TextOptions(
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def _stream_usage(
    req: CompletionRequest | ChatCompletionRequest, frontend: FrontendOptions
) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats): ``stream_options``, or every stream with
    --enable_force_include_usage (vLLM's rule)."""
    options = req.stream_options
    include = frontend.force_include_usage or bool(options and options.include_usage)
    return include, include and bool(options and options.continuous_usage_stats)


def _frontend_fields(
    req: CompletionRequest | ChatCompletionRequest, frontend: FrontendOptions
) -> dict[str, Any]:
    """The Prepared fields that come from vLLM's server flags (a request may override some)."""
    include_usage, continuous_usage = _stream_usage(req, frontend)
    as_ids = req.return_tokens_as_token_ids
    return {
        "include_usage": include_usage,
        "continuous_usage": continuous_usage,
        "role": frontend.response_role,
        "tokens_as_ids": frontend.tokens_as_ids if as_ids is None else as_ids,
        "prompt_tokens_details": frontend.prompt_tokens_details,
    }


def _truncated(
    ids: list[int], req: CompletionRequest | ChatCompletionRequest, facts: ModelFacts
) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: keep N tokens (-1: the context less one); by default
    the last N (vLLM loads generation tokenizers with ``truncation_side="left"``)."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep > facts.max_model_len:
        raise InvalidInput(
            f"truncate_prompt_tokens={keep} cannot be greater than max_model_len="
            f"{facts.max_model_len}. Please request a smaller truncation size.",
            param="truncate_prompt_tokens",
        )
    if keep < 0:
        keep = max(0, facts.max_model_len - 1)
    if keep >= len(ids):
        return ids
    side = req.truncation_side or "left"
    return ids[len(ids) - keep :] if side == "left" else ids[:keep]


def prepare_completion(
    req: CompletionRequest,
    tok: GenerationTokenizer,
    facts: ModelFacts,
    limits: GenerationLimits,
    *,
    headers: RequestHeaders | None = None,
    frontend: FrontendOptions | None = None,
    parsing: OutputParsing | None = None,
) -> Prepared:
    headers = headers or RequestHeaders()
    frontend = frontend or FrontendOptions()
    _check_common("completion", req, limits)
    if req.suffix is not None:
        raise InvalidInput("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidInput("best_of must equal n (beam search is not supported)", param="best_of")
    _check_logprobs(req.logprobs, limits, facts, "logprobs")
    prompts = _completion_prompts(req, tok, facts, limits)
    longest = max(len(p.ids) for p in prompts)
    max_tokens = _max_tokens(req.max_tokens, longest, facts, default_rest=False)
    prompt_logprobs = _prompt_logprobs(req, limits, facts)
    if prompt_logprobs is None and req.echo:  # vLLM: echo reports the prompt's logprobs too
        prompt_logprobs = req.logprobs
    structured, source = structured_output(req.response_format, req.structured_outputs)
    params = _sampling(
        req, facts, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs,
        structured=structured,
    )  # fmt: skip
    gates = parsing.reasoning_gate if structured is not None and parsing is not None else None
    return Prepared(
        structured_source=source,
        reasoning_gates=gates,
        kind="completion", request_id=_response_id("cmpl", headers, req), created=int(time.time()),
        model=req.model, prompts=prompts, n=req.n, params=params, stops=_stops(req.stop, limits),
        echo=req.echo, stream=req.stream, logprobs=req.logprobs, text=_text_options(req),
        priority=_priority(req, headers, limits), prompt_logprobs=prompt_logprobs,
        **_frontend_fields(req, frontend),
    )  # fmt: skip


def _completion_prompts(
    req: CompletionRequest, tok: GenerationTokenizer, facts: ModelFacts, limits: GenerationLimits
) -> list[PromptInput]:
    prompt: Any = req.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = list(prompt)
    else:
        raise InvalidInput(
            "prompt must be a non-empty string, list of strings or token ids", param="prompt"
        )
    if len(items) > limits.max_prompts:
        raise InvalidInput(f"at most {limits.max_prompts} prompts per request", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            full = tok.encode(item, add_special_tokens=req.add_special_tokens)
            ids = _truncated(full, req, facts)
            # echo repeats the prompt the model saw: the text itself, unless it was cut.
            text = item if len(ids) == len(full) else tok.decode(ids, skip_special_tokens=False)
        else:
            ids = list(item)
            if any(not 0 <= t < facts.vocab_size for t in ids):
                raise InvalidInput(
                    f"prompt token ids must be in [0, {facts.vocab_size})", param="prompt"
                )
            ids = _truncated(ids, req, facts)
            text = tok.decode(ids, skip_special_tokens=False)
        if not ids:
            raise InvalidInput("the prompt is empty after tokenization", param="prompt")
        out.append(PromptInput(ids, text))
    return out


def _text_of(content: str | list[dict[str, object]] | None) -> str:
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content)
    return content or ""


@functools.lru_cache(maxsize=32)
def _loops_over_content(template: str) -> bool:
    """Whether a Jinja chat template iterates over a message's content (``{% for part in
    message['content'] %}``, ``message.content``, or a variable named ``content``): such templates
    want content as a list of parts. Unparsable templates count as string templates."""
    import jinja2  # on first use: importing lmserve_core stays light
    from jinja2 import nodes

    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    for loop in tree.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Name) and it.name == "content":
            return True
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return True
        if (
            isinstance(it, nodes.Getitem)
            and isinstance(it.arg, nodes.Const)
            and it.arg.value == "content"
        ):
            return True
    return False


def _content_format(option: str, template: str) -> str:
    """vLLM's --chat-template-content-format: "auto" looks at the template."""
    if option != "auto":
        return option
    return "openai" if _loops_over_content(template) else "string"


def _tool_call_arguments(arguments: str) -> dict[str, Any]:
    """An assistant tool call's arguments as the chat template wants them: an object (vLLM's
    rule: JSON that is no object, or no JSON, becomes {} so the conversation can go on)."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def chat_messages(
    req: ChatCompletionRequest, content_format: str = "string"
) -> list[dict[str, Any]]:
    """The messages as the chat template gets them: content as one string ("string") or as a
    list of text parts ("openai"), developer turned system, names kept; assistant tool calls
    with their arguments as objects, tool messages with the id of the call they answer."""
    if not req.messages:
        raise InvalidInput("messages must not be empty", param="messages")
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, msg in enumerate(req.messages):
        if msg.role not in CHAT_ROLES:
            raise InvalidInput(
                f"messages[{i}].role {msg.role!r} is not one of {', '.join(sorted(CHAT_ROLES))}",
                param=f"messages[{i}].role",
            )
        content = msg.content
        texts: list[str] = []
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidInput(
                        f"messages[{i}].content[{j}]: only text parts are supported "
                        f"(got type {part.get('type')!r})", param=f"messages[{i}].content",
                    )  # fmt: skip
                texts.append(str(part["text"]))
        elif content is None:
            if msg.role != "assistant":
                raise InvalidInput(
                    f"messages[{i}].content is required", param=f"messages[{i}].content"
                )
        else:
            texts.append(content)
        if msg.tool_calls and msg.role != "assistant":
            raise InvalidInput(
                f"messages[{i}].tool_calls: only assistant messages carry tool calls",
                param=f"messages[{i}].tool_calls",
            )
        role = "system" if msg.role == "developer" else msg.role
        rendered: str | list[dict[str, str]] = (
            [{"type": "text", "text": t} for t in texts]
            if content_format == "openai"
            else "\n".join(texts)
        )
        message: dict[str, Any] = {"role": role, "content": rendered}
        if msg.name is not None:  # templates that know names render them (vLLM passes it on)
            message["name"] = msg.name
        if msg.role == "assistant" and msg.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name,
                    "arguments": _tool_call_arguments(call.function.arguments),
                }}
                for call in msg.tool_calls
            ]  # fmt: skip
            call_ids.update(call.id for call in msg.tool_calls)
        if msg.reasoning is not None and msg.role == "assistant":
            message["reasoning"] = msg.reasoning
        if msg.role == "tool":
            # Better than vLLM, which renders whatever comes: a result must answer a call.
            if msg.tool_call_id is None:
                raise InvalidInput(
                    f"messages[{i}].tool_call_id is required for role 'tool'",
                    param=f"messages[{i}].tool_call_id",
                )
            if msg.tool_call_id not in call_ids:
                raise InvalidInput(
                    f"messages[{i}].tool_call_id {msg.tool_call_id!r} answers no tool call of "
                    "an earlier assistant message", param=f"messages[{i}].tool_call_id",
                )  # fmt: skip
            message["tool_call_id"] = msg.tool_call_id
        out.append(message)
    return out


def _check_tool_support(mode: ToolMode, frontend: FrontendOptions) -> None:
    """vLLM's rule for "auto"; "required" and a named function need no parser here (the output
    is held to the tools' schema), where vLLM asks for --tool-call-parser."""
    if mode == "auto" and not (frontend.enable_auto_tool_choice or frontend.tool_call_parser):
        raise InvalidInput(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
            "be set", param="tool_choice",
        )  # fmt: skip


def prepare_chat(
    req: ChatCompletionRequest,
    tok: GenerationTokenizer,
    facts: ModelFacts,
    limits: GenerationLimits,
    *,
    trust_request_template: bool,
    headers: RequestHeaders | None = None,
    frontend: FrontendOptions | None = None,
    parsing: OutputParsing | None = None,
) -> Prepared:
    headers = headers or RequestHeaders()
    frontend = frontend or FrontendOptions()
    _check_common("chat", req, limits)
    mode = tool_mode(req)
    _check_tool_support(mode, frontend)
    structured, source = structured_output(req.response_format, req.structured_outputs)
    if mode == "named" and structured is not None and req.structured_outputs is not None:
        raise InvalidInput(
            "You can only either use constraints for structured outputs or tools, not both.",
            param="structured_outputs",
        )
    if req.continue_final_message and req.add_generation_prompt:
        raise InvalidInput(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    top = req.top_logprobs
    if top is not None and not req.logprobs:
        raise InvalidInput("top_logprobs needs logprobs: true", param="top_logprobs")
    _check_logprobs(top, limits, facts, "top_logprobs")
    if req.chat_template is not None and not trust_request_template:
        raise InvalidInput(
            "per-request chat_template is refused; start the server with "
            "--trust_request_chat_template to allow it", param="chat_template",
        )  # fmt: skip
    # The tokenizer's template is the model's, or --chat_template's (the loaders put it there).
    template = req.chat_template or tok.chat_template
    if not template:
        raise InvalidInput(
            "this model has no chat template; use /completions or start lmserve with "
            "--chat_template FILE", param="messages",
        )  # fmt: skip
    messages = chat_messages(req, _content_format(frontend.content_format, template))
    extra = template_kwargs(req)
    if req.tools and not (mode == "none" and frontend.exclude_tools_when_tool_choice_none):
        extra["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
    try:
        text = tok.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt, chat_template=template,
            extra=extra,
        )  # fmt: skip
    except Exception as exc:  # template errors (jinja raise_exception) are the client's
        raise InvalidInput(f"cannot apply the chat template: {exc}", param="messages") from None
    # The template writes BOS itself where the model wants one: no double BOS (vLLM's
    # add_special_tokens defaults to false on chat for that reason).
    ids = _truncated(tok.encode(text, add_special_tokens=req.add_special_tokens), req, facts)
    if not ids:
        raise InvalidInput("the rendered conversation is empty", param="messages")
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = _max_tokens(requested, len(ids), facts, default_rest=True)
    logprobs = (top or 0) if req.logprobs else None
    prompt_logprobs = _prompt_logprobs(req, limits, facts)
    if prompt_logprobs is None and req.echo:  # vLLM: echo reports the prompt's logprobs too
        prompt_logprobs = top or 0
    request_parsing = parsing.for_request(req, ids) if parsing is not None else None
    text_options = _text_options(req)
    reasoning_gates: Callable[[], ReasoningGate | None] | None = None
    if request_parsing is not None:
        adjust = request_parsing.adjustments
        if adjust.structured is not None:  # tool_choice required/named: the tools' schema
            structured, source = adjust.structured, "tools"
        if adjust.skip_special_tokens is not None:
            text_options = replace(text_options, skip_special_tokens=adjust.skip_special_tokens)
        if structured is not None:
            reasoning_gates = request_parsing.reasoning_gate
        if not request_parsing.active:
            request_parsing = None
    params = _sampling(
        req, facts, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        structured=structured,
    )  # fmt: skip
    echo_text = ""
    if req.echo and req.messages[-1].role == frontend.response_role:
        echo_text = _text_of(req.messages[-1].content)
    return Prepared(
        kind="chat", request_id=_response_id("chatcmpl", headers, req), created=int(time.time()),
        model=req.model, prompts=[PromptInput(ids, text)], n=req.n, params=params,
        stops=_stops(req.stop, limits), echo=req.echo, stream=req.stream, logprobs=logprobs,
        text=text_options, echo_text=echo_text, priority=_priority(req, headers, limits),
        prompt_logprobs=prompt_logprobs, structured_source=source, parsing=request_parsing,
        tool_mode=mode, parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning_gates=reasoning_gates,
        include_reasoning=req.include_reasoning, **_frontend_fields(req, frontend),
    )  # fmt: skip


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """vLLM's: ``chat_template_kwargs``, then the request's template fields that are set
    (``reasoning_effort`` also turns ``enable_thinking`` on unless "none" or given)."""
    kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
    fields: dict[str, Any] = {
        "continue_final_message": req.continue_final_message,
        "documents": req.documents,
        "reasoning_effort": req.reasoning_effort,
    }
    if req.reasoning_effort is not None and "enable_thinking" not in kwargs:
        fields["enable_thinking"] = req.reasoning_effort != "none"
    kwargs.update({k: v for k, v in fields.items() if v not in (None, "auto")})
    return kwargs
