"""The encoder pipeline: texts -> tokens -> (batched) forward -> task outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np

from lmserve_core.batching import DynamicBatcher, ItemError
from lmserve_core.encoder.base import (
    EncodedRequest,
    EncoderOptions,
    EncoderResult,
    EncoderTask,
    FloatArray,
    ModelInfo,
    RequestParams,
    TaskContext,
)
from lmserve_core.encoder.fill_mask import FillMask
from lmserve_core.encoder.rerank import Rerank
from lmserve_core.encoder.sequence_classification import SequenceClassification
from lmserve_core.encoder.text_embedding import TextEmbedding
from lmserve_core.encoder.token_classification import TokenClassification
from lmserve_core.encoder.truncation import Truncation
from lmserve_core.errors import BackendError, InputTooLong, InvalidInput, LmserveError
from lmserve_core.lora import LoRAAdapter
from lmserve_core.observer import ServingObserver
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding, TextTokenizer

ENCODER_TASKS: dict[Task, EncoderTask] = {
    handler.task: handler
    for handler in (
        SequenceClassification(),
        TokenClassification(),
        FillMask(),
        TextEmbedding(),
        Rerank(),
    )
}

Int64Array = np.ndarray
# Requests with at most this many characters are tokenized on the event loop; longer ones on a
# worker thread, so one huge request cannot stall the loop.
INLINE_TOKENIZE_CHARS = 2000
# A batch runs as length-sorted chunks (``chunk_rows``) only when they carry at least this much
# less padding than one pass: each forward pass has a fixed cost, which on a tiny model
# outweighs a little padding (the benchmark sentences, of like lengths, stay one pass).
CHUNK_MIN_SAVING = 0.1


class EncoderBackend(Protocol):
    """Runs the model: padded int64 arrays in, one float array out (numpy only)."""

    def forward(self, inputs: Mapping[str, Int64Array]) -> FloatArray:
        """``inputs``: input_ids, attention_mask (and token_type_ids) [N, L].

        Returns logits ([N, C] or [N, L, C]) or, for embeddings, the last hidden state.
        """
        ...

    def close(self) -> None: ...

    def check_health(self) -> None:
        """Raise ``ModelNotReady`` when the model cannot serve now (a remote predictor down)."""
        ...


class AdapterEncoderBackend(EncoderBackend, Protocol):
    """An encoder backend that serves LoRA adapters (``lmserve_core.lora.AdapterBackend``)."""

    def forward_with_adapters(
        self, inputs: Mapping[str, Int64Array], adapters: Sequence[LoRAAdapter | None]
    ) -> FloatArray:
        """``forward`` with one adapter per row (None: the base model), in one pass."""
        ...


def length_bucket(length: int, *, max_length: int, smallest: int = 16) -> int:
    """``length`` rounded up to a power of two (at least ``smallest``, at most ``max_length``).

    A remote predictor's dynamic batcher (Triton's) only merges requests of the same shape;
    a handful of padded lengths lets it merge batches that arrive together.
    """
    bucket = smallest
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, max_length))


def pad_encodings(
    encodings: Sequence[Encoding], *, pad_id: int, length: int, with_token_types: bool
) -> dict[str, Int64Array]:
    """Right-pad (encoders use absolute positions from 0) to ``length``."""
    n = len(encodings)
    ids = np.full((n, length), pad_id, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    types = np.zeros((n, length), dtype=np.int64) if with_token_types else None
    for i, enc in enumerate(encodings):
        k = len(enc)
        ids[i, :k] = enc.ids
        mask[i, :k] = 1
        if types is not None and enc.type_ids:
            types[i, :k] = enc.type_ids
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out


class EncoderService:
    """One served encoder model: validation, tokenization, dynamic batching, outputs."""

    def __init__(
        self,
        *,
        task: Task,
        tokenizer: TextTokenizer,
        backend: EncoderBackend,
        info: ModelInfo,
        options: EncoderOptions,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        bucket_lengths: bool = False,
        concurrency: int = 1,
        max_instances: int | None = None,
        observer: ServingObserver | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        """``max_batch_size`` / ``max_batch_tokens``: the batcher's limits (instances, padded
        tokens); ``max_instances``: most instances per request (more is a 400);
        ``bucket_lengths``: pad batches to ``length_bucket`` sizes, not to their
        longest input; ``concurrency``: batches in flight at once (see ``DynamicBatcher``);
        ``observer``: metrics hooks (batch sizes, queue time); ``chunk_rows``: forward a
        batch of more rows as length-sorted chunks of at most this many (see
        ``LoadedEncoder.chunk_rows``)."""
        if task not in ENCODER_TASKS:
            raise ValueError(f"{task} is not an encoder task")
        self.task = task
        self.handler = ENCODER_TASKS[task]
        self.backend = backend
        self.bucket_lengths = bucket_lengths
        self.chunk_rows = chunk_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_instances = max_instances
        self._observer = observer
        self.context = TaskContext(tokenizer=tokenizer, info=info, options=options)
        self.batcher: DynamicBatcher[EncodedRequest, FloatArray] = DynamicBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            name="encoder",
            concurrency=concurrency,
            observer=observer,
        )

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.context.tokenizer

    @property
    def info(self) -> ModelInfo:
        return self.context.info

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.backend.close()

    # --- request path ------------------------------------------------------------
    async def infer(
        self,
        instances: Sequence[Any],
        parameters: Mapping[str, Any] | None,
        adapter: LoRAAdapter | None = None,
    ) -> EncoderResult:
        """KServe V1/V2 instances: texts, or (query, document) pairs for a reranker.
        ``adapter``: the LoRA adapter the request's model name picked (None: the base)."""
        params = RequestParams.parse(parameters)
        if self.task is Task.rerank:
            return await self.score_pairs(check_pairs(instances), params, adapter)
        return await self.infer_texts(check_texts(instances), params, adapter)

    async def infer_texts(
        self,
        texts: list[str],
        params: RequestParams,
        adapter: LoRAAdapter | None = None,
        truncation: Truncation | None = None,
    ) -> EncoderResult:
        """``truncation``: a per-request token limit (vLLM's ``truncate_prompt_tokens``)."""
        self._check_count(len(texts), "instances")
        if truncation is None:
            # Tokenized with the rest of its batch on the model thread (_tokenize_batch): one
            # encode_batch per forward pass, none on the event loop.
            request = EncodedRequest.untokenized(texts, params, max_length=self.info.max_length)
        elif sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            # Tens of microseconds with a Rust tokenizer: less than the hop to a thread.
            request = self.encode(texts, params, truncation)
        else:
            request = await asyncio.to_thread(self.encode, texts, params, truncation)
        request.adapter = adapter
        return await self.infer_encoded(request)

    async def score_pairs(
        self,
        pairs: list[tuple[str, str]],
        params: RequestParams,
        adapter: LoRAAdapter | None = None,
        truncation: Truncation | None = None,
    ) -> EncoderResult:
        """A reranker's score for each (query, document) pair, in order. ``truncation``: a
        per-request limit on each pair's tokens (its side is the document's)."""
        if self.task is not Task.rerank:
            raise InvalidInput(f"a {self.task.value} model does not score pairs", param="model")
        self._check_count(len(pairs), "instances")
        if truncation is None:  # tokenized with its batch, as in infer_texts
            max_length = self.info.max_length
            request = EncodedRequest.untokenized_pairs(pairs, params, max_length=max_length)
        elif sum(len(q) + len(d) for q, d in pairs) <= INLINE_TOKENIZE_CHARS:
            request = self.encode_pairs(pairs, params, truncation)
        else:
            request = await asyncio.to_thread(self.encode_pairs, pairs, params, truncation)
        request.adapter = adapter
        return await self.infer_encoded(request)

    def encode(
        self, texts: list[str], params: RequestParams, truncation: Truncation | None = None
    ) -> EncodedRequest:
        max_length = self.info.max_length
        add_special = self._add_special(params)
        if truncation is not None:
            encodings = truncation.apply(self.tokenizer, texts, add_special, max_length)
        elif params.truncate:
            encodings = self.tokenizer.encode_batch(
                texts, add_special_tokens=add_special, max_length=max_length
            )
        else:
            encodings = self.tokenizer.encode_batch(
                texts, add_special_tokens=add_special, max_length=None
            )
            self._check_lengths(encodings)
        return self._request(texts, encodings, params)

    def encode_pairs(
        self,
        pairs: list[tuple[str, str]],
        params: RequestParams,
        truncation: Truncation | None = None,
    ) -> EncodedRequest:
        """Pairs truncated document first when too long (``truncate`` false: a 400)."""
        max_length = self.info.max_length
        if truncation is not None:
            if truncation.side is not None:
                raise InvalidInput(
                    "truncation_side does not apply to pairs: the document is cut first",
                    param="truncation_side",
                )
            max_length = truncation.limit(max_length)
        encodings = self.tokenizer.encode_pairs(
            pairs, add_special_tokens=self._add_special(params),
            max_length=max_length if params.truncate or truncation else None,
        )  # fmt: skip
        if not params.truncate:
            self._check_lengths(encodings)
        return self._request([q for q, _ in pairs], encodings, params)

    def _add_special(self, params: RequestParams) -> bool:
        if params.add_special_tokens is None:
            return self.context.options.add_special_tokens
        return params.add_special_tokens

    def _check_lengths(self, encodings: Sequence[Encoding]) -> None:
        max_length = self.info.max_length
        for i, enc in enumerate(encodings):
            if len(enc) > max_length:
                raise InputTooLong(
                    f"instance {i} has {len(enc)} tokens, more than the model's maximum "
                    f"of {max_length} (truncate is false)",
                    param="truncate",
                )

    def _request(
        self, texts: list[str], encodings: list[Encoding], params: RequestParams
    ) -> EncodedRequest:
        request = EncodedRequest(texts, encodings, params)
        self._validate(request)
        return request

    def _validate(self, request: EncodedRequest) -> None:
        if any(len(e) == 0 for e in request.encodings):
            raise InvalidInput("an instance tokenized to no tokens at all", param="instances")
        self.handler.validate(request, self.context)

    def encode_token_ids(
        self,
        rows: Sequence[Sequence[int]],
        params: RequestParams,
        truncation: Truncation | None = None,
    ) -> EncodedRequest:
        """Pre-tokenized input (OpenAI embeddings accept token ids)."""
        self._check_count(len(rows), "input")
        vocab = self.info.vocab_size
        encodings = []
        for i, row in enumerate(rows):
            if not row:
                raise InvalidInput(f"input {i} is an empty token list", param="input")
            if vocab is not None and any(t < 0 or t >= vocab for t in row):
                raise InvalidInput(f"input {i} has token ids outside [0, {vocab})", param="input")
            ids = list(row)
            if truncation is not None:
                keep = truncation.limit(self.info.max_length)
                if len(ids) > keep:
                    ids = ids[-keep:] if truncation.side == "left" else ids[:keep]
            if len(ids) > self.info.max_length:
                if not params.truncate:
                    raise InputTooLong(
                        f"input {i} has {len(ids)} tokens, more than {self.info.max_length}",
                        param="input",
                    )
                ids = ids[: self.info.max_length]
            n = len(ids)
            encodings.append(Encoding(ids, [0] * n, [(0, 0)] * n, [0] * n, [None] * n))
        return self._request([""] * len(encodings), encodings, params)

    async def infer_encoded(self, request: EncodedRequest) -> EncoderResult:
        outputs = await self.batcher.submit(request)
        result = self.handler.postprocess(outputs, request, self.context)
        result.token_count = sum(len(e) for e in request.encodings)
        return result

    def _check_count(self, count: int, param: str) -> None:
        if self.max_instances is not None and count > self.max_instances:
            raise InvalidInput(
                f"{count} instances in one request; the limit is {self.max_instances} "
                "(--max_instances_per_request)", param=param,
            )  # fmt: skip

    # --- model thread ------------------------------------------------------------
    def _run_batch(self, requests: Sequence[EncodedRequest]) -> list[FloatArray | ItemError]:
        failed = self._tokenize_batch(requests)
        ready = [req for i, req in enumerate(requests) if i not in failed]
        outputs = self._forward_requests(ready) if ready else iter(())
        return [failed[i] if i in failed else next(outputs) for i in range(len(requests))]

    def _tokenize_batch(self, requests: Sequence[EncodedRequest]) -> dict[int, ItemError]:
        """Tokenize the batch's untokenized requests, one ``encode_batch`` (``encode_pairs``
        for a reranker) per setting (add special tokens, truncate) rather than one per request;
        check each as ``encode`` and ``encode_pairs`` do. Returns the requests that fail (by
        index), each with its own error."""
        groups: dict[tuple[bool, bool, bool], list[int]] = {}
        for i, req in enumerate(requests):
            if not req.tokenized:
                key = (req.pairs is not None, self._add_special(req.params), req.params.truncate)
                groups.setdefault(key, []).append(i)
        failed: dict[int, ItemError] = {}
        for (_, add_special, truncate), members in groups.items():
            max_length = self.info.max_length if truncate else None
            group = [requests[i] for i in members]
            try:
                encodings: list[Encoding] | None = self._encode_all(group, add_special, max_length)
            except LmserveError:
                encodings = None  # a text it cannot take: find whose, one request at a time
            start = 0
            for i, req in zip(members, group, strict=True):
                try:
                    if encodings is None:
                        own = self._encode_all([req], add_special, max_length)
                    else:
                        own = encodings[start : start + req.size]
                    start += req.size
                    if not truncate:
                        self._check_lengths(own)
                    req.set_encodings(own)
                    self._validate(req)
                except LmserveError as exc:
                    failed[i] = ItemError(exc)
        return failed

    def _encode_all(
        self, requests: Sequence[EncodedRequest], add_special: bool, max_length: int | None
    ) -> list[Encoding]:
        """Every input of ``requests`` (all texts, or all pairs) in one tokenizer call."""
        if requests[0].pairs is not None:  # over max_length the document is cut first
            pairs = [pair for req in requests for pair in req.pairs or ()]
            return self.tokenizer.encode_pairs(
                pairs, add_special_tokens=add_special, max_length=max_length
            )
        texts = [text for req in requests for text in req.texts]
        return self.tokenizer.encode_batch(
            texts, add_special_tokens=add_special, max_length=max_length
        )

    def _forward_requests(self, requests: Sequence[EncodedRequest]) -> Iterator[FloatArray]:
        """Each request's rows of one batched forward (as length-sorted passes when that cuts
        padding or the batch is over ``max_batch_tokens``)."""
        encodings = [enc for req in requests for enc in req.encodings]
        adapters = [req.adapter for req in requests for _ in range(req.size)]
        chunks = self._length_sorted_chunks(encodings)
        if chunks is not None:
            outputs = self._forward_chunks(encodings, adapters, chunks)
        else:
            outputs = self._forward(encodings, adapters)
        row = 0
        for req in requests:
            part = outputs[row : row + req.size]
            row += req.size
            # Each request sees outputs padded to its own longest input, as if alone.
            # (Backends that pool themselves, like vLLM's, return [N, D] with no sequence axis.)
            trim = self.handler.sequence_output and part.ndim == 3
            yield part[:, : req.seq_len] if trim else part

    def _forward(
        self, encodings: Sequence[Encoding], adapters: Sequence[LoRAAdapter | None]
    ) -> FloatArray:
        """One forward pass over ``encodings``, padded to the longest (or its bucket)."""
        length = max(len(e) for e in encodings)
        if self.bucket_lengths:
            length = length_bucket(length, max_length=self.info.max_length)
        inputs = pad_encodings(
            encodings,
            pad_id=self.tokenizer.pad_token_id,
            length=length,
            with_token_types=self.context.options.return_token_type_ids,
        )
        started = time.perf_counter()
        if any(a is not None for a in adapters):
            # Rows of different adapters and of the base share the pass (PEFT's mixed batch).
            backend = cast(AdapterEncoderBackend, self.backend)
            outputs = backend.forward_with_adapters(inputs, adapters)
        else:
            outputs = self.backend.forward(inputs)
        if self._observer is not None:
            self._observer.forward_pass(time.perf_counter() - started)
        if outputs.shape[0] != len(encodings):
            raise BackendError(
                f"the model returned {outputs.shape[0]} rows for {len(encodings)} inputs"
            )
        return outputs

    def _length_sorted_chunks(self, encodings: Sequence[Encoding]) -> list[list[int]] | None:
        return length_sorted_chunks(
            [len(e) for e in encodings],
            chunk_rows=self.chunk_rows,
            max_batch_tokens=self.max_batch_tokens,
        )

    def _forward_chunks(
        self,
        encodings: Sequence[Encoding],
        adapters: Sequence[LoRAAdapter | None],
        chunks: Sequence[Sequence[int]],
    ) -> FloatArray:
        """A forward pass per chunk of rows, outputs put back in row order: a short row no
        longer pads to the batch's longest one (as sentence-transformers' ``predict`` and
        ``encode`` sort). Sequence outputs are padded back to the batch's longest row;
        requests only read their own rows' positions."""
        longest = max(len(e) for e in encodings)
        merged: FloatArray | None = None
        for chunk in chunks:
            out = self._forward([encodings[i] for i in chunk], [adapters[i] for i in chunk])
            per_token = self.handler.sequence_output and out.ndim == 3
            if merged is None:
                shape = [len(encodings), *out.shape[1:]]
                if per_token:
                    shape[1] = longest
                merged = np.zeros(shape, dtype=out.dtype)
            index = np.asarray(chunk)
            if per_token:
                merged[index, : out.shape[1]] = out
            else:
                merged[index] = out
        assert merged is not None
        return merged


def length_sorted_chunks(
    lengths: Sequence[int], *, chunk_rows: int | None, max_batch_tokens: int | None
) -> list[list[int]] | None:
    """How a batch of rows of ``lengths`` tokens is forwarded: row indices in length order,
    cut into chunks of at most ``chunk_rows`` rows and ``max_batch_tokens`` padded tokens,
    when one pass would be over that budget (the batcher groups untokenized requests by
    estimated lengths) or when chunks cut the padded tokens of one pass by at least
    ``CHUNK_MIN_SAVING``; else None (one pass)."""
    rows, budget = chunk_rows, max_batch_tokens
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    one_pass = len(lengths) * lengths[order[-1]]
    over_budget = budget is not None and one_pass > budget and len(lengths) > 1
    if not over_budget and (not rows or len(lengths) <= rows):
        return None
    chunks: list[list[int]] = [[]]
    for i in order:  # longest last, so each chunk's padded length is its last row's
        chunk = chunks[-1]
        full = rows is not None and len(chunk) >= rows
        if chunk and (full or (budget and (len(chunk) + 1) * lengths[i] > budget)):
            chunks.append([i])
        else:
            chunk.append(i)
    if over_budget:
        return chunks
    chunked = sum(len(chunk) * lengths[chunk[-1]] for chunk in chunks)
    return chunks if chunked <= (1 - CHUNK_MIN_SAVING) * one_pass else None


def check_pairs(instances: Sequence[Any]) -> list[tuple[str, str]]:
    """A reranker's instances: ``[query, document]`` lists, or ``{"text", "text_pair"}``
    objects (the transformers pipeline's pair input)."""
    if not isinstance(instances, list | tuple) or len(instances) == 0:
        raise InvalidInput("expected a non-empty list of [query, document] pairs",
                           param="instances")  # fmt: skip
    pairs = []
    for i, item in enumerate(instances):
        if isinstance(item, dict) and set(item) == {"text", "text_pair"}:
            item = [item["text"], item["text_pair"]]
        if not (isinstance(item, list | tuple) and len(item) == 2
                and all(isinstance(t, str) for t in item)):  # fmt: skip
            raise InvalidInput(
                f"instance {i} must be a [query, document] pair of strings (or "
                '{"text": query, "text_pair": document}) for a rerank model',
                param="instances",
            )
        if not item[0] or not item[1]:
            raise InvalidInput(f"instance {i} has an empty query or document", param="instances")
        pairs.append((item[0], item[1]))
    return pairs


def check_texts(texts: Sequence[Any]) -> list[str]:
    if not isinstance(texts, list | tuple) or len(texts) == 0:
        raise InvalidInput("expected a non-empty list of input strings", param="instances")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(
                f"instance {i} is {type(text).__name__}, expected a string", param="instances"
            )
    return list(texts)
