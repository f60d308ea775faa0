"""EncoderBackend on vLLM's pooling runner: embeddings and sequence classification.

lmserve's encoder pipeline tokenizes and batches; this backend hands each row's token ids
to vLLM and returns pooled vectors [N, D] (embed) or raw class logits [N, C] (classify),
which the task handlers post-process exactly as for the Hugging Face backend.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmserve_backend_vllm.ray_cluster import NodeWatch


class VLLMPoolingEncoder:
    def __init__(
        self, engine: Any, loop: asyncio.AbstractEventLoop, *, task: str,
        node_watch: NodeWatch | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.node_watch = node_watch  # --distributed-executor-backend ray
        self.loop = loop
        self.task = task  # "embed" or "classify"
        self._ids = itertools.count()

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Runs on the batcher's thread; the engine lives on the event loop."""
        rows = [ids[mask.astype(bool)].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"],
                                                                           strict=True)]  # fmt: skip
        future = asyncio.run_coroutine_threadsafe(self._encode_all(rows), self.loop)
        return np.stack(future.result())

    async def _encode_all(self, rows: list[list[int]]) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self._encode(row) for row in rows)))

    async def _encode(self, row: list[int]) -> np.ndarray:
        from vllm import PoolingParams

        # Raw logits for classification: lmserve applies softmax/argmax itself (docs/behaviour.md §4).
        params = PoolingParams(
            task=self.task, use_activation=False if self.task == "classify" else None
        )
        result = None
        async for out in self.engine.encode(
            {"prompt_token_ids": row}, params, f"pool-{next(self._ids)}"
        ):
            result = out
        assert result is not None
        return np.asarray(result.outputs.data.float().cpu().numpy(), dtype=np.float32)

    def check_health(self) -> None:
        if getattr(self.engine, "errored", False):
            from lmserve_core.errors import ModelNotReady

            raise ModelNotReady("the vLLM engine has died")
        if self.node_watch is not None:
            self.node_watch.check()

    def close(self) -> None:
        self.engine.shutdown()
