"""The OpenAI layer, written once above every generative backend.

It turns backend token streams into OpenAI completions and chat responses: incremental
detokenization, stop strings, n choices, logprobs, echo, usage, and stream chunks.
Streaming is the only shape; non-streaming responses collect the same deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lmserve_core.errors import BackendError, InvalidInput, ModelNotReady
from lmserve_core.generation.backend import GenerationTokenizer, GenerativeBackend
from lmserve_core.generation.chat_output import StreamedChoice, parsed_message
from lmserve_core.generation.detokenizer import IncrementalDetokenizer
from lmserve_core.generation.output_parsing import OutputParsing
from lmserve_core.generation.params import GenerationRequest, TokenLogprob
from lmserve_core.generation.prepare import (
    FrontendOptions,
    GenerationLimits,
    ModelFacts,
    Prepared,
    PromptInput,
    RequestHeaders,
    prepare_chat,
    prepare_completion,
)
from lmserve_core.generation.stop import StopStringMatcher
from lmserve_core.observer import GenerationObserver
from lmserve_protocols.openai import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)

_Chunk = TypeVar("_Chunk", CompletionChunk, ChatCompletionChunk)


def _finite(logprob: float) -> float:
    """vLLM's floor: a token a constraint masked out has -inf, sent as -9999.0 (JSON has no
    infinity)."""
    return max(logprob, -9999.0)


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    generated_tokens: int = 0  # running count for this choice
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    cached_tokens: int | None = None  # prompt tokens from the prefix cache (first delta)
    token_ids: list[int] = field(default_factory=list)  # the tokens this delta adds


class OpenAIGenerationService:
    """The OpenAI completions and chat layer, written once above any ``GenerativeBackend``:
    request validation, chat templates, stop strings, n, logprobs, echo, usage and stream
    chunks (``prepare_*`` then ``complete`` or ``stream``)."""

    def __init__(
        self,
        *,
        backend: GenerativeBackend,
        tokenizer: GenerationTokenizer,
        facts: ModelFacts,
        limits: GenerationLimits | None = None,
        trust_request_chat_template: bool = False,
        options: FrontendOptions | None = None,
        observer: GenerationObserver | None = None,
        output_parsing: OutputParsing | None = None,
        structured_compile_timeout: float = 30.0,
    ) -> None:
        """``output_parsing``: tool calls and reasoning in chat output (None: all content, and
        only tool_choice "none"); ``structured_compile_timeout``: seconds a new output
        constraint may take to compile before the request is refused."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.facts = facts
        self.limits = limits or GenerationLimits()
        self.trust_request_chat_template = trust_request_chat_template
        self.options = options or FrontendOptions()
        self.observer = observer
        self.output_parsing = output_parsing
        self.structured_compile_timeout = structured_compile_timeout

    # --- preparation (raises InvalidInput) ---------------------------------------------
    def prepare_completion(
        self, req: CompletionRequest, *, headers: RequestHeaders | None = None
    ) -> Prepared:
        """``headers``: what vLLM reads from the HTTP headers (X-Request-Id, X-Vllm-Priority)."""
        return prepare_completion(
            req, self.tokenizer, self.facts, self.limits, headers=headers, frontend=self.options,
            parsing=self.output_parsing,
        )  # fmt: skip

    def prepare_chat(
        self, req: ChatCompletionRequest, *, headers: RequestHeaders | None = None
    ) -> Prepared:
        return prepare_chat(
            req, self.tokenizer, self.facts, self.limits,
            trust_request_template=self.trust_request_chat_template, headers=headers,
            frontend=self.options, parsing=self.output_parsing,
        )  # fmt: skip

    async def check_structured(self, prep: Prepared) -> None:
        """Compile the request's output constraint (once per distinct constraint: backends
        cache it) before anything is generated, so a bad schema is a 400 naming its field.
        Compiling runs in a worker thread and is refused past the time limit."""
        spec = prep.params.structured
        if spec is None:
            return
        work = asyncio.to_thread(self.backend.check_structured_output, spec)
        try:
            await asyncio.wait_for(work, self.structured_compile_timeout)
        except InvalidInput as exc:
            raise InvalidInput(exc.message, param=prep.structured_source) from None
        except TimeoutError:
            raise InvalidInput(
                f"the {spec.kind} constraint did not compile within "
                f"{self.structured_compile_timeout:g} s; simplify it",
                param=prep.structured_source,
            ) from None

    # --- one choice ---------------------------------------------------------------------
    async def _choice(
        self, prep: Prepared, prompt: PromptInput, index: int, seq: int
    ) -> AsyncIterator[ChoiceDelta]:
        params = prep.choice_params(seq)
        if params.max_tokens == 0:
            yield ChoiceDelta(index, finish_reason="length")
            return
        options = prep.text
        detok = IncrementalDetokenizer(
            self.tokenizer, None if self.facts.is_encoder_decoder else prompt.ids,
            skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
        )  # fmt: skip
        matcher = StopStringMatcher(prep.stops, include=options.include_stop_str_in_output)
        gate = prep.reasoning_gates() if prep.reasoning_gates is not None else None
        request = GenerationRequest(
            f"{prep.request_id}-{index}", prompt.ids, params, prep.priority, reasoning=gate,
            adapter=prep.adapter,
        )  # fmt: skip
        served = prep.served_name
        stream = self.backend.generate(request)
        generated = 0
        started = last = time.perf_counter()
        try:
            async for event in stream:
                delta = ChoiceDelta(
                    index, prompt_logprobs=event.prompt_logprobs, cached_tokens=event.cached_tokens
                )
                if event.queued_seconds is not None and self.observer:
                    self.observer.queue_time(event.queued_seconds, model=served)
                if event.token_id is not None:
                    delta.token_ids.append(event.token_id)
                    generated += 1
                    now = time.perf_counter()
                    if self.observer:
                        if generated == 1:
                            self.observer.first_token(now - started, model=served)
                        else:
                            self.observer.inter_token(now - last, model=served)
                    last = now
                    # The stop token's own text only with include_stop_str_in_output (vLLM).
                    if not event.is_stop_token or options.include_stop_str_in_output:
                        # Stop strings count only after min_tokens (vLLM).
                        check = generated > params.min_tokens
                        delta.text = matcher.feed(detok.add(event.token_id), check=check)
                    # vLLM's logprobs include the stop token (EOS too), its text does not.
                    if event.logprob is not None:
                        delta.logprobs.append(event.logprob)
                delta.generated_tokens = generated
                if matcher.stopped:
                    delta.finish_reason, delta.stop_reason = "stop", matcher.matched
                    yield delta
                    return
                if event.finish_reason is not None:
                    if event.finish_reason == "abort":
                        raise ModelNotReady(
                            "the request was aborted by the server (shutting down?)"
                        )
                    delta.text += matcher.feed(detok.flush())
                    delta.text += matcher.flush()
                    if matcher.stopped:
                        delta.finish_reason, delta.stop_reason = "stop", matcher.matched
                    else:
                        delta.finish_reason, delta.stop_reason = (
                            event.finish_reason,
                            event.stop_reason,
                        )
                    yield delta
                    return
                if delta.text or delta.logprobs or delta.prompt_logprobs:
                    yield delta
            raise BackendError("the backend ended a sequence without a finish reason")
        finally:
            # Closing the backend stream aborts generation (stop string, client gone).
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    def _choices(self, prep: Prepared) -> list[tuple[int, PromptInput, int]]:
        return [
            (p * prep.n + j, prompt, j)
            for p, prompt in enumerate(prep.prompts)
            for j in range(prep.n)
        ]

    async def _merged(self, prep: Prepared) -> AsyncIterator[ChoiceDelta]:
        """All choices' deltas as they come; cancelling this cancels every choice."""
        queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

        async def pump(index: int, prompt: PromptInput, seq: int) -> None:
            try:
                async for delta in self._choice(prep, prompt, index, seq):
                    await queue.put(delta)
            except BaseException as exc:
                await queue.put(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, p, s)) for i, p, s in self._choices(prep)]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- non-streaming ------------------------------------------------------------------
    async def complete(self, prep: Prepared) -> CompletionResponse | ChatCompletionResponse:
        indices = [i for i, _, _ in self._choices(prep)]
        texts: dict[int, list[str]] = {i: [] for i in indices}
        token_ids: dict[int, list[int]] = {i: [] for i in indices}
        lps: dict[int, list[TokenLogprob]] = {i: [] for i in indices}
        prompt_lps: dict[int, tuple[TokenLogprob | None, ...]] = {}
        finish: dict[int, FinishReason] = {}
        stop_reasons: dict[int, int | str | None] = {}
        counts: dict[int, int] = {}
        cached: dict[int, int] = {}
        async for d in self._merged(prep):
            if d.cached_tokens is not None:
                cached[d.index] = d.cached_tokens
            texts[d.index].append(d.text)
            token_ids[d.index].extend(d.token_ids)
            lps[d.index].extend(d.logprobs)
            if d.prompt_logprobs is not None:
                prompt_lps[d.index] = d.prompt_logprobs
            counts[d.index] = d.generated_tokens
            if d.finish_reason:
                finish[d.index] = d.finish_reason
                stop_reasons[d.index] = d.stop_reason
        usage = self._usage(prep, sum(counts.values()), cached)
        self._observe(prep, usage)
        if prep.kind == "chat":
            chat_choices = []
            for index in indices:
                text, reason = "".join(texts[index]), finish.get(index, "length")
                if prep.parsing is not None:
                    message, reason = parsed_message(
                        prep, prep.parsing, text, token_ids[index], reason
                    )
                else:
                    message = ChatResponseMessage(role=prep.role, content=text)
                if prep.echo_text:
                    message.content = prep.echo_text + (message.content or "")
                chat_choices.append(ChatCompletionChoice(
                    index=index, message=message, finish_reason=reason,
                    logprobs=self._chat_logprobs(lps[index], prep.tokens_as_ids) if prep.chat_logprobs_shown else None,
                    stop_reason=stop_reasons.get(index),
                ))  # fmt: skip
            return ChatCompletionResponse(
                id=prep.request_id, created=prep.created, model=prep.model, usage=usage,
                prompt_logprobs=self._prompt_logprobs(prep, prompt_lps.get(0)),
                choices=chat_choices,
            )  # fmt: skip
        choices = []
        for index in indices:
            prompt = prep.prompts[index // prep.n]
            logprobs = None
            if prep.logprobs is not None:
                logprobs = self._completion_logprobs(
                    lps[index], prompt if prep.echo else None, prompt_lps.get(index),
                    prep.logprobs, prep.tokens_as_ids,
                )  # fmt: skip
            choices.append(
                CompletionChoice(
                    index=index,
                    text=(prompt.text if prep.echo else "") + "".join(texts[index]),
                    logprobs=logprobs,
                    finish_reason=finish.get(index, "length"),
                    stop_reason=stop_reasons.get(index),
                    prompt_logprobs=self._prompt_logprobs(prep, prompt_lps.get(index)),
                )
            )
        return CompletionResponse(
            id=prep.request_id, created=prep.created, model=prep.model, choices=choices, usage=usage
        )

    # --- streaming ----------------------------------------------------------------------
    async def stream(
        self, prep: Prepared, on_usage: Callable[[UsageInfo], None] | None = None
    ) -> AsyncIterator[CompletionChunk | ChatCompletionChunk]:
        """The stream's chunks, one per server-sent event (the server frames them and adds
        the closing ``[DONE]``). ``on_usage`` gets the token counts once the last choice has
        finished; with ``stream_options.include_usage`` a last chunk carries them too.

        An error after the first chunk propagates (the chunks before it were yielded): the
        server turns it into an error event through its one status table.
        """
        counts: dict[int, int] = {}
        cached: dict[int, int] = {}
        deltas = self._merged(prep)
        try:
            if prep.kind == "chat":
                for index, _, _ in self._choices(prep):
                    role = {"role": prep.role, "content": ""}
                    yield self._with_usage(prep, self._chat_chunk(prep, index, role), index, 0)
                if prep.echo_text:  # vLLM echoes the final assistant message in one chunk
                    for index, _, _ in self._choices(prep):
                        echo = self._chat_chunk(prep, index, {"content": prep.echo_text})
                        yield self._with_usage(prep, echo, index, 0)
            echoed: set[int] = set()
            parsed: dict[int, StreamedChoice] = {}
            if prep.parsing is not None:
                parsed = {i: StreamedChoice(prep, prep.parsing.new_choice())
                          for i, _, _ in self._choices(prep)}  # fmt: skip
            async for d in deltas:
                counts[d.index] = d.generated_tokens
                if d.cached_tokens is not None:
                    cached[d.index] = d.cached_tokens
                if prep.kind == "chat":
                    chat_lp = None
                    if prep.chat_logprobs_shown and d.logprobs:
                        chat_lp = self._chat_logprobs(d.logprobs, prep.tokens_as_ids)
                    finish = d.finish_reason
                    choice = parsed.get(d.index)
                    if choice is not None:
                        fields = choice.delta(d.text, d.token_ids, finished=finish is not None)
                        if finish is not None:
                            finish = choice.finish_reason(finish)
                        if fields is None and finish is None and chat_lp is None:
                            continue
                        delta = fields or {}
                    else:
                        if not d.text and finish is None and chat_lp is None:
                            continue
                        delta = {"content": d.text} if d.text else {}
                    chunk = self._chat_chunk(prep, d.index, delta, chat_lp, finish, d.stop_reason)
                    yield self._with_usage(prep, chunk, d.index, d.generated_tokens)
                    continue
                text = d.text
                echo_prompt = None
                if prep.echo and d.index not in echoed:
                    echoed.add(d.index)
                    echo_prompt = prep.prompts[d.index // prep.n]
                    text = echo_prompt.text + text
                lp = None
                if prep.logprobs is not None:
                    lp = self._completion_logprobs(
                        d.logprobs, echo_prompt, d.prompt_logprobs, prep.logprobs,
                        prep.tokens_as_ids,
                    )  # fmt: skip
                text_chunk = self._completion_chunk(
                    prep, d.index, text, lp, d.finish_reason, d.stop_reason
                )
                yield self._with_usage(prep, text_chunk, d.index, d.generated_tokens)
            usage = self._usage(prep, sum(counts.values()), cached)
            self._observe(prep, usage)
            if on_usage is not None:
                on_usage(usage)
            if prep.include_usage:
                chunk_type = ChatCompletionChunk if prep.kind == "chat" else CompletionChunk
                yield chunk_type(id=prep.request_id, created=prep.created, model=prep.model,
                                 choices=[], usage=usage)  # fmt: skip
        finally:
            # A consumer that closes this stream early (client gone) aborts every choice
            # now; ``async for`` alone leaves the inner generator to the garbage collector.
            await deltas.aclose()  # type: ignore[attr-defined]

    # --- formatting ---------------------------------------------------------------------
    # A chunk per token: it goes in as a dict, which the chunk model validates in one call
    # (building the nested models one by one cost a third more per chunk).
    @staticmethod
    def _chat_chunk(
        prep: Prepared,
        index: int,
        delta: dict[str, Any],
        logprobs: ChatChoiceLogprobs | None = None,
        finish: FinishReason | None = None,
        stop_reason: int | str | None = None,
    ) -> ChatCompletionChunk:
        """``delta``: a :class:`ChatDelta`'s fields."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                  "stop_reason": stop_reason}  # fmt: skip
        return OpenAIGenerationService._chunk(ChatCompletionChunk, prep, choice)

    @staticmethod
    def _completion_chunk(
        prep: Prepared,
        index: int,
        text: str,
        logprobs: CompletionLogprobs | None = None,
        finish: FinishReason | None = None,
        stop_reason: int | str | None = None,
    ) -> CompletionChunk:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                  "stop_reason": stop_reason}  # fmt: skip
        return OpenAIGenerationService._chunk(CompletionChunk, prep, choice)

    @staticmethod
    def _chunk(kind: type[_Chunk], prep: Prepared, choice: dict[str, Any]) -> _Chunk:
        body = {"id": prep.request_id, "created": prep.created, "model": prep.model}
        return kind.model_validate({**body, "choices": [choice]})

    @staticmethod
    def _with_usage(prep: Prepared, chunk: _Chunk, index: int, generated: int) -> _Chunk:
        """``stream_options.continuous_usage_stats``: each chunk carries its choice's usage so
        far (its prompt's tokens and the tokens generated for it), as vLLM's does."""
        if prep.continuous_usage:
            prompt_tokens = len(prep.prompts[index // prep.n].ids)
            chunk.usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                    total_tokens=prompt_tokens + generated)  # fmt: skip
        return chunk

    def _observe(self, prep: Prepared, usage: UsageInfo) -> None:
        if self.observer:
            self.observer.tokens(
                usage.prompt_tokens, usage.completion_tokens, model=prep.served_name
            )

    def _usage(
        self, prep: Prepared, completion_tokens: int, cached: dict[int, int] | None = None
    ) -> UsageInfo:
        """Each prompt counts once, whatever ``n``; so do its cached tokens (those its first
        choice found in the prefix cache, as vLLM's one request per prompt reports)."""
        prompt_tokens = sum(len(p.ids) for p in prep.prompts)
        details = None
        if prep.prompt_tokens_details and cached:
            hits = sum(cached.get(p * prep.n, 0) for p in range(len(prep.prompts)))
            if hits:  # vLLM reports details only when some tokens were cached
                details = PromptTokensDetails(cached_tokens=hits)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=details)  # fmt: skip

    def _prompt_logprobs(
        self, prep: Prepared, entries: tuple[TokenLogprob | None, ...] | None
    ) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs``: per prompt token, it and the top-k, keyed by token id."""
        k = prep.prompt_logprobs
        if k is None:
            return None
        out: PromptLogprobs = []
        for entry in entries or ():
            if entry is None:
                out.append(None)
                continue
            candidates = {
                tid: PromptLogprob(logprob=lp, rank=rank, decoded_token=self._token_text(tid))
                for rank, (tid, lp) in enumerate(entry.top[:k], start=1)
            }
            candidates.setdefault(entry.token_id, PromptLogprob(
                logprob=entry.logprob, rank=entry.rank,
                decoded_token=self._token_text(entry.token_id),
            ))  # fmt: skip
            out.append(candidates)
        return out

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob_token(self, as_ids: bool, token_id: int) -> str:
        """A logprob entry's token: its text, or "token_id:N" (return_tokens_as_token_ids)."""
        return f"token_id:{token_id}" if as_ids else self._token_text(token_id)

    def _top_logprob(self, as_ids: bool, token_id: int, logprob: float) -> TopLogprob:
        text = self._logprob_token(as_ids, token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))

    def _chat_logprobs(self, entries: list[TokenLogprob], as_ids: bool) -> ChatChoiceLogprobs:
        content = []
        for e in entries:
            # vLLM: the chosen token's bytes are its text's, even when named "token_id:N".
            decoded = self._token_text(e.token_id)
            content.append(ChatTokenLogprob(
                token=self._logprob_token(as_ids, e.token_id), logprob=_finite(e.logprob),
                bytes=list(decoded.encode("utf-8")),
                top_logprobs=[self._top_logprob(as_ids, tid, lp) for tid, lp in e.top],
            ))  # fmt: skip
        return ChatChoiceLogprobs(content=content)

    def _completion_logprobs(
        self,
        entries: list[TokenLogprob],
        echo_prompt: PromptInput | None,
        prompt_lps: tuple[TokenLogprob | None, ...] | None,
        k: int,
        as_ids: bool,
    ) -> CompletionLogprobs:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo_prompt is not None:
            for i, tid in enumerate(echo_prompt.ids):
                tokens.append(self._logprob_token(as_ids, tid))
                plp = prompt_lps[i] if prompt_lps is not None and i < len(prompt_lps) else None
                token_lps.append(_finite(plp.logprob) if plp else None)
                tops.append(
                    {self._logprob_token(as_ids, t): _finite(lp) for t, lp in plp.top[:k]}
                    if plp
                    else None
                )
        for e in entries:
            text = self._logprob_token(as_ids, e.token_id)
            tokens.append(text)
            token_lps.append(_finite(e.logprob))
            top = {self._logprob_token(as_ids, t): _finite(lp) for t, lp in e.top[:k]}
            top.setdefault(text, _finite(e.logprob))
            tops.append(top)
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets
        )
