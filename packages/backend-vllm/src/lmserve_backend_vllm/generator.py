"""GenerativeBackend on vLLM's AsyncLLM: token ids in, streamed token events out.

Stop strings, detokenization, n and the OpenAI formats live in lmserve's OpenAI layer,
so vLLM runs with ``detokenize=False`` and one sequence per request; both backends then
behave identically above this seam.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from lmserve_backend_vllm.ray_cluster import NodeWatch
from lmserve_core.errors import BackendError, InvalidInput
from lmserve_core.generation.params import (
    GenerationRequest,
    StructuredOutput,
    TokenEvent,
    TokenLogprob,
)
from lmserve_core.lora import LoRAAdapter

logger = logging.getLogger(__name__)


def _logprob(entry: dict[int, Any] | None, token: int, k: int) -> TokenLogprob | None:
    if entry is None or token not in entry:
        return None
    ranked = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda item: item[1].rank)  # fmt: skip
    return TokenLogprob(
        token,
        float(entry[token].logprob),
        tuple((tid, float(lp.logprob)) for tid, lp in ranked),
        entry[token].rank,
    )


def _cached_tokens(output: Any) -> int | None:
    """Prompt tokens vLLM found in its prefix cache for this request."""
    cached = getattr(output, "num_cached_tokens", None)
    return int(cached) if isinstance(cached, int) else None


def _queued_seconds(output: Any) -> float | None:
    """Time between vLLM queueing and scheduling the request (its own stats, when kept)."""
    stats = getattr(output, "metrics", None)
    queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
    if queued and scheduled and scheduled >= queued:
        return float(scheduled - queued)
    return None


def structured_outputs(spec: StructuredOutput | None) -> Any:
    """lmserve's constraint as vLLM's ``StructuredOutputsParams`` (vLLM's own engine runs it)."""
    if spec is None:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    value: Any = spec.value
    if spec.kind == "choice":
        value = json.loads(spec.value)
    elif spec.kind == "json_object":
        value = True
    return StructuredOutputsParams(
        **{spec.kind: value},
        disable_any_whitespace=spec.disable_any_whitespace,
        disable_additional_properties=spec.disable_additional_properties,
        whitespace_pattern=spec.whitespace_pattern,
    )


class VLLMGenerator:
    def __init__(
        self, engine: Any, *, eos_token_ids: frozenset[int], max_model_len: int, vocab_size: int,
        node_watch: NodeWatch | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.node_watch = node_watch  # --distributed-executor-backend ray
        self.eos_token_ids = eos_token_ids
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        # The served adapters' vLLM LoRARequests, by lora_int_id.
        self._loras: dict[int, Any] = {}

    @property
    def _compact_json(self) -> bool:
        """Whether the engine's structured-output config makes every JSON compact."""
        config = self.engine.vllm_config.structured_outputs_config
        return bool(getattr(config, "disable_any_whitespace", False))

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()

    def check_health(self) -> None:
        if getattr(self.engine, "errored", False):
            raise BackendError(
                f"the vLLM engine died: {getattr(self.engine, 'dead_error', 'unknown error')}"
            )
        if self.node_watch is not None:
            self.node_watch.check()

    def num_unfinished(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    # --- LoRA adapters (lmserve_core.lora.AdapterBackend) --------------------------------
    async def add_adapter(self, adapter: LoRAAdapter) -> None:
        """Load the adapter into vLLM's LoRA cache now (as vLLM's load_lora_adapter does), so a
        folder vLLM cannot use is an error here rather than in a request."""
        from vllm.lora.request import LoRARequest

        if self.engine.vllm_config.lora_config is None:
            raise InvalidInput("the vLLM engine runs without --enable-lora", param="lora_name")
        lora = LoRARequest(lora_name=adapter.name, lora_int_id=adapter.int_id,
                           lora_path=adapter.path)  # fmt: skip
        if adapter.base_model_name is not None:
            lora.base_model_name = adapter.base_model_name
        try:
            await self.engine.add_lora(lora)
        except Exception as exc:
            self.check_health()  # a dead engine is a 500, not the adapter's fault
            raise InvalidInput(
                f"vLLM cannot load the LoRA adapter {adapter.name!r} from {adapter.source!r}: "
                f"{_first_line(exc)}", param="lora_path",
            ) from exc  # fmt: skip
        self._loras[adapter.int_id] = lora

    async def remove_adapter(self, adapter: LoRAAdapter) -> None:
        self._loras.pop(adapter.int_id, None)
        try:
            await self.engine.remove_lora(adapter.int_id)
        except Exception as exc:  # evicted from vLLM's cache already: nothing left to free
            logger.debug("vLLM remove_lora(%d): %s", adapter.int_id, exc)

    def _lora_request(self, request: GenerationRequest) -> Any:
        if request.adapter is None:
            return None
        lora = self._loras.get(request.adapter.int_id)
        if lora is None:
            raise InvalidInput(f"the LoRA adapter {request.adapter.name!r} is not loaded",
                               param="model")  # fmt: skip
        return lora

    def check_structured_output(self, spec: StructuredOutput) -> None:
        """vLLM's own check of a request's constraint (the one its server makes before the
        engine sees the request), against the engine's structured-output backend."""
        from vllm import SamplingParams

        if spec.disable_any_whitespace and not self._compact_json:
            # vLLM 0.32's engine reads it from its server-wide config only and would ignore it
            # here: refused rather than ignored (the Hugging Face backend honours it).
            raise InvalidInput(
                "structured_outputs.disable_any_whitespace is not applied per request by vLLM's "
                "engine; start lmserve with --structured-outputs-config "
                "'{\"disable_any_whitespace\": true}' or use the huggingface backend"
            )
        params = SamplingParams(max_tokens=1, structured_outputs=structured_outputs(spec))
        try:
            params._validate_structured_outputs(
                self.engine.model_config,
                self.engine.vllm_config.structured_outputs_config,
                self.engine.tokenizer,
            )
        except Exception as exc:  # VLLMValidationError, xgrammar's RuntimeError, ...
            raise InvalidInput(f"the {spec.kind} constraint does not compile: {exc}") from None

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        return SamplingParams(
            n=1,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k or 0,
            min_p=p.min_p,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logit_bias=dict(p.logit_bias) or None,
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            min_tokens=p.min_tokens,
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs,
            structured_outputs=structured_outputs(p.structured),
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            skip_special_tokens=False,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.check_health()
        params = request.params
        finished = False
        first = True
        try:
            gate = request.reasoning
            # With a reasoning parser, vLLM's engine starts a constraint where reasoning ends.
            reasoning = {} if gate is None else {
                "reasoning_ended": gate.ended_in_prompt, "reasoning_parser_kwargs": gate.parser_kwargs,
            }  # fmt: skip
            stream = self.engine.generate({"prompt_token_ids": list(request.prompt_ids)}, self._sampling(request),
                                          request_id=request.request_id, priority=request.priority,
                                          lora_request=self._lora_request(request),
                                          **reasoning)  # fmt: skip
            async for output in stream:
                completion = output.outputs[0]
                prompt_lps = None
                if (
                    first
                    and params.prompt_logprobs is not None
                    and output.prompt_logprobs is not None
                ):
                    k = params.prompt_logprobs
                    prompt_lps = tuple(
                        None if entry is None else _logprob(entry, tid, k)
                        for tid, entry in zip(
                            request.prompt_ids, output.prompt_logprobs, strict=False
                        )
                    )
                tokens = list(completion.token_ids)
                finish = completion.finish_reason
                if not tokens and finish is not None:
                    finished = True
                    yield TokenEvent(None, finish_reason=finish, prompt_logprobs=prompt_lps)
                    return
                for j, token in enumerate(tokens):
                    last = j == len(tokens) - 1
                    lp = None
                    if params.logprobs is not None and completion.logprobs:
                        lp = _logprob(completion.logprobs[j], token, params.logprobs)
                    reason = finish if last else None
                    is_stop = bool(
                        reason == "stop"
                        and (token in self.eos_token_ids or token in params.stop_token_ids)
                    )
                    stop_reason = completion.stop_reason if is_stop else None
                    event = TokenEvent(token, lp, reason, is_stop, prompt_lps if first else None,
                                       _queued_seconds(output) if first else None,
                                       stop_reason if isinstance(stop_reason, int) else None,
                                       _cached_tokens(output) if first else None)  # fmt: skip
                    first = False
                    prompt_lps = None
                    if reason is not None:
                        finished = True
                    yield event
                if finished:
                    return
        except (BackendError, GeneratorExit):
            raise
        except Exception as exc:
            if getattr(self.engine, "errored", False):
                raise BackendError(f"the vLLM engine died: {exc}") from exc
            raise
        finally:
            if not finished:
                # Client gone or stop string reached: free the slot within one step.
                with contextlib.suppress(Exception):
                    await self.engine.abort(request.request_id)


def _first_line(exc: BaseException) -> str:
    """vLLM's errors carry the engine's traceback text; the client gets the message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[-1] if "Traceback" in text else text.splitlines()[0]
