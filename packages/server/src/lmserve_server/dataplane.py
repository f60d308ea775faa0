"""The transport-agnostic data plane: the REST routes and the gRPC service call this and
nothing below it (an import-linter contract keeps them from the model host and backends).

Name checks, admission and token metrics happen here, once per request, for every task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from prometheus_client import generate_latest

from lmserve_core.admission import Ticket
from lmserve_core.encoder import EncoderResult, EncoderService, RequestParams
from lmserve_core.errors import InvalidInput, ModelNotFound
from lmserve_core.generation.prepare import Prepared, RequestHeaders
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_core.model_host import ModelHost
from lmserve_core.tasks import Task
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

    # --- health and metadata -----------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._host.ready

    def model_ready(self, name: str) -> bool:
        self._host.check_name(name)
        return self._host.ready

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
        # Text models read the first input (KServe's convention); its shape is [N] or [N, 1].
        texts = tensor_to_texts(inputs[0])
        result = await self._infer_texts(name, service, texts, parameters)
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
        service = self._host.require(body.model)
        if service.task is not Task.text_embedding:
            raise InvalidInput(
                f"model {body.model!r} serves {service.task.value}, not text_embedding",
                param="model",
            )
        dim = service.info.hidden_size
        if body.dimensions is not None and body.dimensions != dim:
            raise InvalidInput(
                f"this model does not support 'dimensions' other than its native {dim}",
                param="dimensions",
            )
        texts, token_rows = _split_embedding_input(body.input)
        if texts is not None:
            return await self._infer_texts(body.model, service, texts, None)
        request = service.encode_token_ids(token_rows or [], RequestParams())
        request.adapter = self._host.adapter_for(body.model)
        return await self._admitted(body.model, lambda: service.infer_encoded(request))

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

    # --- metrics ---------------------------------------------------------------------
    def render_metrics(self) -> bytes:
        """The Prometheus text page, with the gauges read at scrape time brought up to date."""
        self.metrics.model_ready.labels(self._host.name).set(1 if self.ready() else 0)
        unfinished = self._host.unfinished_sequences()
        if unfinished is not None:
            self.metrics.sequences_unfinished.set(unfinished)
        return bytes(generate_latest(self.metrics.registry))


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
