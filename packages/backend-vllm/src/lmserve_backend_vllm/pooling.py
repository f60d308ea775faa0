"""EncoderBackend on vLLM's pooling runner: embeddings, sequence classification, reranking.

lmserve's encoder pipeline tokenizes (a reranker's (query, document) pairs included) and
batches; this backend hands each row's token ids to vLLM and returns what the task handlers
post-process exactly as for the Hugging Face backend: pooled but unnormalised vectors [N, D]
(embed: TextEmbedding cuts Matryoshka dimensions, then normalises) or raw logits [N, C]
(classify; a reranker's [N, 1], to which Rerank applies the CrossEncoder's activation).

A BERT-style cross-encoder tells the query from the document by token types. vLLM takes them
as its own scoring path sends them (``vllm/entrypoints/pooling/scoring/io_processor.py``): the
position of the first type-1 token (``compress_token_type_ids``) in the request's
``PoolingParams.extra_kwargs["compressed_token_type_ids"]``; its model runner rebuilds the
types from it and the BERT model folds them into the input ids.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lmserve_backend_vllm.ray_cluster import NodeWatch
from lmserve_core.errors import BackendError

# The vLLM pooling tasks lmserve uses (vllm.tasks.PoolingTask).
PoolingTaskName = Literal["embed", "classify"]


class VLLMPoolingEncoder:
    def __init__(
        self, engine: Any, loop: asyncio.AbstractEventLoop, *, task: PoolingTaskName,
        token_types: bool = False, node_watch: NodeWatch | None = None,
    ) -> None:  # fmt: skip
        """``task``: vLLM's pooling task ("embed" or "classify"); ``token_types``: send the
        rows' ``token_type_ids`` (a BERT cross-encoder's pairs)."""
        self.engine = engine
        self.node_watch = node_watch  # --distributed-executor-backend ray
        self.loop = loop
        self.task = task
        self.token_types = token_types
        self._ids = itertools.count()

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Runs on the batcher's thread; the engine lives on the event loop."""
        rows = request_rows(inputs, token_types=self.token_types)
        future = asyncio.run_coroutine_threadsafe(self._encode_all(rows), self.loop)
        return np.stack(future.result())

    async def _encode_all(self, rows: list[tuple[list[int], int | None]]) -> list[np.ndarray]:
        return list(await asyncio.gather(*(self._encode(ids, types) for ids, types in rows)))

    async def _encode(self, row: list[int], first_type_one: int | None) -> np.ndarray:
        from vllm import PoolingParams

        # The pooler's raw output: lmserve applies softmax/argmax (classify), the
        # CrossEncoder's activation (rerank) and normalisation after any Matryoshka cut (embed)
        # itself, the same code for every backend (docs/behaviour.md §4).
        params = PoolingParams(task=self.task, use_activation=False)
        if first_type_one is not None:
            params.extra_kwargs = {"compressed_token_type_ids": first_type_one}
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


def request_rows(
    inputs: Mapping[str, np.ndarray], *, token_types: bool
) -> list[tuple[list[int], int | None]]:
    """Each row's real token ids (padding dropped) and, with ``token_types``, the position of
    its first type-1 token (None when it has none: vLLM then reads all zeros)."""
    rows = []
    types = inputs.get("token_type_ids") if token_types else None
    for i, (ids, mask) in enumerate(
        zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ):
        real = mask.astype(bool)
        first = None if types is None else first_type_one(types[i][real].tolist())
        rows.append((ids[real].tolist(), first))
    return rows


def first_type_one(token_type_ids: Sequence[int]) -> int | None:
    """vLLM's ``compress_token_type_ids`` (zeros, then ones: the position of the first one),
    None for all zeros. Any other shape (a tokenizer whose pairs are not laid out like BERT's)
    cannot travel to vLLM: an error, not a silently different input."""
    first = None
    for i, type_id in enumerate(token_type_ids):
        if type_id == 1 and first is None:
            first = i
        elif type_id > 1 or (type_id == 0 and first is not None):
            raise BackendError(
                "vLLM takes a pair's token types as zeros followed by ones; the tokenizer "
                f"gave {list(token_type_ids)}"
            )
    return first
