"""The transport-agnostic data plane: REST (and later gRPC) call these, nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from lmserve_core.encoder import EncoderResult, RequestParams
from lmserve_core.errors import InvalidInput
from lmserve_core.v2_codec import DecodedTensor, tensor_to_texts
from lmserve_server.metrics import Metrics
from lmserve_server.model_host import ModelHost

V2_EXTENSIONS = ["binary_tensor_data", "model_repository"]


def server_version() -> str:
    try:
        return version("lmserve-server")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


class DataPlane:
    def __init__(self, host: ModelHost, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics

    # --- health and metadata -----------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.host.ready

    def model_ready(self, name: str) -> bool:
        self.host.check_name(name)
        return self.host.ready

    def model_names(self) -> list[str]:
        return [self.host.name]

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "lmserve", "version": server_version(), "extensions": V2_EXTENSIONS}

    def model_metadata(self, name: str) -> dict[str, Any]:
        self.host.check_usable(name)
        plan = self.host.plan
        loaded = self.host.loaded
        service = self.host.service
        parameters: dict[str, Any] = {
            "task": plan.task.value,
            "backend": self.host.backend_name,
            "backend_reason": self.host.backend_reason,
            "source": plan.source.display_name,
            **(loaded.details if loaded else {}),
        }
        if service is None:
            # Generative models speak OpenAI, not V2 tensors.
            parameters["routes"] = ["/openai/v1/completions", "/openai/v1/chat/completions"]
            inputs: list[dict[str, Any]] = []
            outputs: list[dict[str, Any]] = []
        else:
            parameters["max_length"] = service.info.max_length
            inputs = [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
            outputs = [
                {"name": n, "datatype": dt, "shape": shape}
                for n, dt, shape in service.handler.output_metadata(service.context)
            ]
        return {
            "name": name,
            "versions": [],
            "platform": f"lmserve/{self.host.backend_name}",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": parameters,
        }

    # --- inference -----------------------------------------------------------------
    async def infer_texts(
        self, name: str, texts: Sequence[Any], parameters: Mapping[str, Any] | None
    ) -> EncoderResult:
        service = self.host.require(name)
        with self.host.gate.admit():
            result = await service.infer(
                list(texts) if isinstance(texts, list | tuple) else texts, parameters
            )
        self.metrics.input_tokens.inc(result.token_count)
        return result

    async def infer_token_ids(self, name: str, rows: Sequence[Sequence[int]]) -> EncoderResult:
        """Pre-tokenized input (OpenAI embeddings accept token id lists)."""
        service = self.host.require(name)
        with self.host.gate.admit():
            encoded = service.encode_token_ids(rows, RequestParams())
            result = await service.infer_encoded(encoded)
        self.metrics.input_tokens.inc(result.token_count)
        return result

    async def infer_v2(
        self, name: str, inputs: Sequence[DecodedTensor], parameters: Mapping[str, Any] | None
    ) -> EncoderResult:
        self.host.require(name)
        if not inputs:
            raise InvalidInput("a V2 request needs at least one input", param="inputs")
        # Text models read the first input (KServe's convention); its shape is [N] or [N, 1].
        texts = tensor_to_texts(inputs[0])
        return await self.infer_texts(name, texts, parameters)


def v2_outputs(result: EncoderResult) -> list[tuple[str, str, np.ndarray]]:
    return [(o.name, o.datatype, o.data) for o in result.outputs]
