"""The transport-agnostic data plane: the REST routes and the gRPC service call this and
nothing below it (an import-linter contract keeps them from the model host and backends).

Name checks, admission and token metrics happen here, once per request, for every task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import numpy as np
from prometheus_client import generate_latest

from lmserve_core.admission import Ticket
from lmserve_core.encoder import EncoderResult, EncoderService, RequestParams, Truncation
from lmserve_core.errors import InvalidInput, ModelNotFound, ModelNotReady
from lmserve_core.generation.prepare import Prepared, RequestHeaders
from lmserve_core.generation.request_fields import refuse_unimplemented
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_core.model_host import ModelHost
from lmserve_core.scoring import cosine_scores, input_text, input_texts, pair_up, ranking
from lmserve_core.tasks import Task
from lmserve_core.tokenize import (
    EncoderTokenizing,
    GeneratorTokenizing,
    Tokenizing,
    detokenize,
    tokenize,
)
from lmserve_core.v2_codec import DecodedTensor, tensor_to_texts
from lmserve_protocols.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    UnloadLoRAAdapterRequest,
    UsageInfo,
)
from lmserve_protocols.scoring import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
)
from lmserve_protocols.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from lmserve_protocols.v2 import V2ModelMetadata, V2ServerMetadata, V2TensorMetadata
from lmserve_server.metrics import Metrics

V2_EXTENSIONS = ["binary_tensor_data"]


def server_version() -> str:
    try:
        return version("lmserve-server")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


@dataclass
class AdmittedGeneration:
    """A validated generation request holding its admission ticket.

    The caller releases the ticket when the response is over: after ``complete`` returns, or
    after the last byte (or the client's disconnect) of ``stream``.
    """

    service: OpenAIGenerationService
    prepared: Prepared
    ticket: Ticket

    @property
    def streaming(self) -> bool:
        return self.prepared.stream

    async def complete(self) -> CompletionResponse | ChatCompletionResponse:
        return await self.service.complete(self.prepared)

    def stream(
        self, on_usage: Callable[[UsageInfo], None]
    ) -> AsyncIterator[CompletionChunk | ChatCompletionChunk]:
        return self.service.stream(self.prepared, on_usage=on_usage)


@dataclass
class V2Result:
    """V2 output tensors as (name, datatype, array), and the input tokens they cost."""

    outputs: list[tuple[str, str, np.ndarray]]
    token_count: int


class DataPlane:
    def __init__(self, host: ModelHost, metrics: Metrics) -> None:
        self._host = host
        self.metrics = metrics
        # With --api_workers: whether every worker has loaded (api_worker sets it). Readiness
        # waits for it, so a probe answered by one worker never sends traffic to another that
        # is still loading and would answer 503.
        self.peers_loaded: Callable[[], bool] = lambda: True

    # --- health and metadata -----------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._host.ready and self.peers_loaded()

    def model_ready(self, name: str) -> bool:
        self._host.check_name(name)
        return self.ready()

    def model_name(self, requested: str | None) -> str:
        """The name a request means: its ``model``, or the served model when it names none
        (vLLM's rule for every route but completions and chat)."""
        return requested or self._host.name

    def model_names(self) -> list[str]:
        """Every served name (--model_name, --served_model_name, the primary one first), then
        each LoRA adapter's."""
        return self._host.all_names

    def model_cards(self) -> list[ModelCard]:
        """OpenAI's model list as vLLM gives it: each base name with the weights' source as
        ``root``, then each adapter with its path as ``root`` and its base as ``parent``."""
        host = self._host
        generator = host.generator
        context = generator.facts.max_model_len if generator is not None else None
        root = host.plan.source.display_name
        cards = [ModelCard(id=name, created=host.created, root=root, max_model_len=context)
                 for name in host.names]  # fmt: skip
        for adapter in host.adapters.adapters:
            parent = adapter.base_model_name or host.name
            cards.append(
                ModelCard(id=adapter.name, created=host.created, root=adapter.source, parent=parent)
            )
        return cards

    def server_metadata(self) -> V2ServerMetadata:
        return V2ServerMetadata(name="lmserve", version=server_version(), extensions=V2_EXTENSIONS)

    def model_metadata(self, name: str) -> V2ModelMetadata:
        self._host.check_usable(name)
        plan = self._host.plan
        loaded = self._host.loaded
        service = self._host.service
        parameters: dict[str, Any] = {
            "task": plan.task.value,
            "backend": self._host.backend_name,
            "backend_reason": self._host.backend_reason,
            "source": plan.source.display_name,
            **(loaded.details if loaded else {}),
        }
        adapter = self._host.adapter_for(name)
        if adapter is not None:
            parameters["lora_adapter"] = {
                "source": adapter.source, "rank": adapter.rank,
                "base_model": adapter.base_model_name or self._host.name,
            }  # fmt: skip
        if service is None:
            # Generative models speak OpenAI, not V2 tensors.
            parameters["routes"] = ["/openai/v1/completions", "/openai/v1/chat/completions"]
            inputs: list[V2TensorMetadata] = []
            outputs: list[V2TensorMetadata] = []
        else:
            parameters["max_length"] = service.info.max_length
            inputs = [V2TensorMetadata(name="input-0", datatype="BYTES", shape=[-1])]
            outputs = [
                V2TensorMetadata(name=n, datatype=dt, shape=shape)
                for n, dt, shape in service.handler.output_metadata(service.context)
            ]
        return V2ModelMetadata(
            name=name,
            platform=f"lmserve/{self._host.backend_name}",
            inputs=inputs,
            outputs=outputs,
            parameters=parameters,
        )

    # --- encoder inference -----------------------------------------------------------
    async def infer_texts(
        self, name: str, texts: Sequence[Any], parameters: Mapping[str, Any] | None
    ) -> EncoderResult:
        return await self._infer_texts(name, self._host.require(name), texts, parameters)

    async def _infer_texts(
        self,
        name: str,
        service: EncoderService,
        texts: Sequence[Any],
        parameters: Mapping[str, Any] | None,
    ) -> EncoderResult:
        texts = list(texts) if isinstance(texts, list | tuple) else texts
        adapter = self._host.adapter_for(name)
        return await self._admitted(name, lambda: service.infer(texts, parameters, adapter))

    async def _admitted(
        self, name: str, infer: Callable[[], Awaitable[EncoderResult]]
    ) -> EncoderResult:
        """Every encoder request: one admission slot (and its adapter's lease) while it runs,
        its tokens counted under the served name."""
        with self._host.admit(name):
            result = await infer()
        self.metrics.input_tokens.labels(self._host.served_name(name)).inc(result.token_count)
        return result

    async def infer_v2(
        self,
        name: str,
        inputs: Sequence[DecodedTensor],
        parameters: Mapping[str, Any] | None,
        requested_outputs: Sequence[str] = (),
    ) -> V2Result:
        """The V2 output tensors, only ``requested_outputs`` when given."""
        service = self._host.require(name)
        if not inputs:
            raise InvalidInput("a V2 request needs at least one input", param="inputs")
        # Text models read the first input (KServe's convention); its shape is [N] or [N, 1]
        # ([N, 2]: query and document, for a reranker).
        instances: list[Any] = tensor_to_texts(inputs[0])
        if service.task is Task.rerank:
            instances = _pairs_of(inputs[0], instances)
        result = await self._infer_texts(name, service, instances, parameters)
        outputs = [(o.name, o.datatype, o.data) for o in result.outputs]
        if requested_outputs:
            wanted = set(requested_outputs)
            unknown = wanted - {output_name for output_name, _, _ in outputs}
            if unknown:
                raise InvalidInput(
                    f"unknown requested output(s): {', '.join(sorted(unknown))}", param="outputs"
                )
            outputs = [o for o in outputs if o[0] in wanted]
        return V2Result(outputs, result.token_count)

    async def embed(self, body: EmbeddingRequest) -> EncoderResult:
        """OpenAI embeddings: strings or token id lists, on a text embedding model."""
        name = body.model or self._host.name
        refuse_unimplemented("embedding", body.model_extra)
        if body.model_extra and "messages" in body.model_extra:
            raise InvalidInput(
                "chat-form embeddings ('messages') are not supported; send 'input'",
                param="messages",
            )
        service = self._host.require(name)
        if service.task is not Task.text_embedding:
            raise InvalidInput(
                f"model {name!r} serves {service.task.value}, not text_embedding", param="model"
            )
        params = RequestParams(
            truncate=body.truncate is not False,
            normalize=_normalize(body),
            dimensions=body.dimensions,
            add_special_tokens=body.add_special_tokens,
        )
        truncation = _truncation(body.truncate_prompt_tokens, body.truncation_side)
        texts, token_rows = _split_embedding_input(body.input)
        adapter = self._host.adapter_for(name)
        if texts is not None:
            return await self._admitted(
                name, lambda: service.infer_texts(texts, params, adapter, truncation)
            )
        request = service.encode_token_ids(token_rows or [], params, truncation)
        request.adapter = adapter
        return await self._admitted(name, lambda: service.infer_encoded(request))

    # --- rerank and score (vLLM's routes; KServe's /openai/v1/rerank) -----------------
    async def rerank(self, body: RerankRequest) -> RerankResponse:
        """Documents ranked by relevance to the query, the best ``top_n`` (0: all)."""
        name = body.model or self._host.name
        refuse_unimplemented("rerank", body.model_extra)
        query = input_text(body.query, "query")
        documents = input_texts(body.documents, "documents")
        scores, tokens = await self._score(name, [query], documents, ("query", "documents"), body)
        results = [
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=RerankDocument(text=documents[i]) if body.return_documents else None,
            )
            for i in ranking(scores, body.top_n)
        ]
        usage = RerankUsage(prompt_tokens=tokens, total_tokens=tokens)
        return RerankResponse(model=name, usage=usage, results=results)

    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """A score per pair, in input order: one to one, one to many, or pairwise."""
        name = body.model or self._host.name
        refuse_unimplemented("score", body.model_extra)
        sides = body.sides
        first, second = input_texts(body.first, sides[0]), input_texts(body.second, sides[1])
        scores, tokens = await self._score(name, first, second, sides, body)
        data = [ScoreResponseData(index=i, score=score) for i, score in enumerate(scores)]
        usage = UsageInfo(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
        return ScoreResponse(model=name, data=data, usage=usage)

    async def _score(
        self,
        name: str,
        first: list[str],
        second: list[str],
        sides: tuple[str, str],
        body: RerankRequest | ScoreRequest,
    ) -> tuple[list[float], int]:
        """(scores, input tokens): a reranker scores each pair; an embedding model the cosine
        of the two embeddings (each text embedded once), as vLLM does."""
        service = self._host.require(name)
        pairs = pair_up(first, second, sides)  # the 400 for mismatched lengths, either way
        truncation = _truncation(body.truncate_prompt_tokens, None)
        adapter = self._host.adapter_for(name)
        if service.task is Task.rerank:
            params = RequestParams(truncate=body.truncate, raw_scores=body.use_activation is False)
            result = await self._admitted(
                name, lambda: service.score_pairs(pairs, params, adapter, truncation)
            )
            return [float(x) for x in result.outputs[0].data], result.token_count
        if service.task is Task.text_embedding:
            params = RequestParams(truncate=body.truncate)
            texts = first + second
            result = await self._admitted(
                name, lambda: service.infer_texts(texts, params, adapter, truncation)
            )
            n = len(first)
            left = [0] * len(second) if n == 1 else list(range(n))
            right = [n + j for j in range(len(second))]
            return cosine_scores(result.outputs[0].data, left, right), result.token_count
        raise InvalidInput(
            f"model {name!r} serves {service.task.value}: rerank and score need a rerank "
            "(cross-encoder) or text_embedding model",
            param="model",
        )

    # --- generation ------------------------------------------------------------------
    async def admit_completion(
        self, body: CompletionRequest, headers: RequestHeaders | None = None
    ) -> AdmittedGeneration:
        """``headers``: what vLLM reads from HTTP headers (X-Request-Id, X-Vllm-Priority)."""
        service = self._host.require_generator(body.model)
        return await self._admit(service, service.prepare_completion(body, headers=headers))

    async def admit_chat(
        self, body: ChatCompletionRequest, headers: RequestHeaders | None = None
    ) -> AdmittedGeneration:
        service = self._host.require_generator(body.model)
        return await self._admit(service, service.prepare_chat(body, headers=headers))

    async def _admit(
        self, service: OpenAIGenerationService, prepared: Prepared
    ) -> AdmittedGeneration:
        # An output constraint that does not compile is a 400 before any slot is taken.
        await service.check_structured(prepared)
        host = self._host
        # The adapter 'model' names (None: the base), held by the ticket until the response
        # ends (an unload waits for it).
        prepared = replace(
            prepared, adapter=host.adapter_for(prepared.model),
            served_name=host.served_name(prepared.model),
        )  # fmt: skip
        # One unit per sequence started: a request with n=4 weighs as much as four with n=1.
        ticket = host.admit(prepared.model, len(prepared.prompts) * prepared.n)
        return AdmittedGeneration(service, prepared, ticket)

    # --- LoRA adapters (vLLM's runtime updates) --------------------------------------
    @property
    def lora_runtime_updates(self) -> bool:
        return self._host.settings.lora_runtime_updates

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> str:
        """vLLM's load_lora_adapter, with its words on success."""
        if not body.lora_name or not body.lora_path:
            raise InvalidInput("Both 'lora_name' and 'lora_path' must be provided.")
        if body.is_3d_lora_weight:
            raise InvalidInput(
                "3D (MoE) LoRA weights are not served here", param="is_3d_lora_weight"
            )
        await self._host.load_adapter(body.lora_name, body.lora_path, inplace=body.load_inplace)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> str:
        if not body.lora_name:
            raise InvalidInput("'lora_name' needs to be provided to unload a LoRA adapter.")
        adapter = self._host.adapters.get(body.lora_name)
        if adapter is not None and body.lora_int_id not in (None, adapter.int_id):
            raise ModelNotFound(
                f"The lora adapter '{body.lora_name}' has id {adapter.int_id}, not "
                f"{body.lora_int_id}.", param="lora_int_id",
            )  # fmt: skip
        await self._host.unload_adapter(body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    # --- tokenize (vLLM's /tokenize and /detokenize) -----------------------------------
    def _tokenizing(self, model: str | None) -> tuple[str, Tokenizing]:
        """The served name (``model``, or the primary one when omitted) and its tokenizer;
        no admission slot: the model itself is not touched."""
        host = self._host
        name = host.name if model is None else model
        host.check_usable(name)  # 404 for a name nothing answers to, 503 unless ready
        generator, service = host.generator, host.service
        if generator is not None:
            return name, GeneratorTokenizing(generator)
        if service is not None:
            return name, EncoderTokenizing(service, name)
        raise ModelNotReady("the server is shutting down")  # closed since the check

    async def tokenize(
        self, body: TokenizeCompletionRequest | TokenizeChatRequest
    ) -> TokenizeResponse:
        name, target = self._tokenizing(body.model)
        return await tokenize(target, body, name)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        _, target = self._tokenizing(body.model)
        return await detokenize(target, body)

    # --- metrics ---------------------------------------------------------------------
    def render_metrics(self) -> bytes:
        """The Prometheus text page, with the gauges read at scrape time brought up to date."""
        self.metrics.model_ready.labels(self._host.name).set(1 if self.ready() else 0)
        unfinished = self._host.unfinished_sequences()
        if unfinished is not None:
            self.metrics.sequences_unfinished.set(unfinished)
        return bytes(generate_latest(self.metrics.registry))


def _pairs_of(tensor: DecodedTensor, texts: list[str]) -> list[list[str]]:
    """A reranker's V2 input: a [N, 2] BYTES tensor of (query, document) rows."""
    shape = list(tensor.data.shape)
    if len(shape) != 2 or shape[1] != 2:
        raise InvalidInput(
            f"a rerank model takes a [N, 2] BYTES input of (query, document) rows; "
            f"input {tensor.name!r} has shape {shape}",
            param="shape",
        )
    return [texts[i : i + 2] for i in range(0, len(texts), 2)]


def _normalize(body: EmbeddingRequest) -> bool:
    """TEI's ``normalize`` and vLLM's ``use_activation`` mean the same; both given must agree."""
    given = {v for v in (body.normalize, body.use_activation) if v is not None}
    if len(given) > 1:
        raise InvalidInput("'normalize' and 'use_activation' disagree", param="normalize")
    return given != {False}


def _truncation(tokens: int | None, side: Literal["left", "right"] | None) -> Truncation | None:
    if tokens is None:
        if side is not None:
            raise InvalidInput(
                "truncation_side needs truncate_prompt_tokens", param="truncation_side"
            )
        return None
    return Truncation(tokens, side)


def _split_embedding_input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput("'input' must be a non-empty string or list", param="input")
    if all(isinstance(v, str) for v in value):
        if any(v == "" for v in value):
            raise InvalidInput("'input' must not contain empty strings", param="input")
        return list(value), None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None, [list(value)]
    if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
        return None, [list(v) for v in value]
    raise InvalidInput(
        "'input' must be a string, a list of strings, or token id lists", param="input"
    )
