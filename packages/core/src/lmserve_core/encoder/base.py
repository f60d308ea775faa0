"""Shared types of the encoder tasks: model facts, serving options, request parameters."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from lmserve_core.errors import InvalidInput
from lmserve_core.lora import LoRAAdapter
from lmserve_core.model_files import PoolingConfig, ScoreActivation
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding, TextTokenizer

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model that post-processing needs."""

    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    max_length: int = 512
    hidden_size: int | None = None
    vocab_size: int | None = None
    # rerank: what CrossEncoder.predict applies to the logit (model_files.cross_encoder_activation).
    score_activation: ScoreActivation = "sigmoid"
    # text_embedding: the Matryoshka sizes the model declares (model_files.matryoshka_dimensions):
    # None for none, () for any size up to hidden_size.
    matryoshka_dimensions: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EncoderOptions:
    """Server-wide output switches (CLI flags)."""

    add_special_tokens: bool = True
    return_token_type_ids: bool = False
    return_probabilities: bool = False
    return_raw_logits: bool = False
    return_offsets_mapping: bool = False


AGGREGATIONS = ("none", "simple", "first", "average", "max")


@dataclass(frozen=True)
class RequestParams:
    """Per-request ``parameters`` (V1 and V2 alike)."""

    labels: bool = False  # {"output": "labels"}: pipeline-style results
    truncate: bool = True
    top_k: int | None = None
    aggregation_strategy: str = "simple"
    # text_embedding: L2-normalise (TEI's ``normalize``, vLLM's ``use_activation``), and keep
    # only the first ``dimensions`` values first (Matryoshka; checked against the model).
    normalize: bool = True
    dimensions: int | None = None
    # rerank: the raw logit instead of the activated score (vLLM's ``use_activation: false``,
    # TEI's ``raw_scores``).
    raw_scores: bool = False
    # Add the tokenizer's special tokens (None: as the server's --disable_special_tokens says).
    add_special_tokens: bool | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> RequestParams:
        if not raw:
            return cls()
        output = raw.get("output")
        if output not in (None, "labels", "default"):
            raise InvalidInput("parameters.output must be 'labels' or 'default'", param="output")
        truncate = raw.get("truncate", True)
        if not isinstance(truncate, bool):
            raise InvalidInput("parameters.truncate must be a boolean", param="truncate")
        top_k = raw.get("top_k")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 1000
        ):
            raise InvalidInput("parameters.top_k must be an integer in [1, 1000]", param="top_k")
        aggregation = raw.get("aggregation_strategy", "simple")
        if aggregation not in AGGREGATIONS:
            raise InvalidInput(
                f"parameters.aggregation_strategy must be one of {', '.join(AGGREGATIONS)}",
                param="aggregation_strategy",
            )
        return cls(
            labels=output == "labels", truncate=truncate, top_k=top_k,
            aggregation_strategy=aggregation,
        )  # fmt: skip


@dataclass
class EncodedRequest:
    """One request's texts, tokenized and unpadded; the unit the batcher merges.

    A request made with ``untokenized`` has no encodings yet: the model thread tokenizes every
    such request of a batch in one ``encode_batch`` call (``EncoderService``), and until then
    ``seq_len`` is ``length_guess``, an estimate from the texts' characters that only orders
    the batcher's grouping (the padded-token budget is enforced on the real lengths).
    """

    texts: list[str]  # a reranker's: the queries
    encodings: list[Encoding]
    params: RequestParams
    # The LoRA adapter the request's model name picked (None: the base model).
    adapter: LoRAAdapter | None = None
    length_guess: int | None = None
    # A reranker's (query, document) pairs, while untokenized.
    pairs: list[tuple[str, str]] | None = None

    @classmethod
    def untokenized(
        cls, texts: list[str], params: RequestParams, *, max_length: int
    ) -> EncodedRequest:
        return cls(texts, [], params, length_guess=_guess(map(len, texts), max_length))

    @classmethod
    def untokenized_pairs(
        cls, pairs: list[tuple[str, str]], params: RequestParams, *, max_length: int
    ) -> EncodedRequest:
        guess = _guess((len(q) + len(d) + 4 for q, d in pairs), max_length)
        return cls([q for q, _ in pairs], [], params, length_guess=guess, pairs=pairs)

    @property
    def tokenized(self) -> bool:
        return self.length_guess is None

    @property
    def size(self) -> int:
        return len(self.texts)

    @property
    def seq_len(self) -> int:
        if self.length_guess is not None:
            return self.length_guess
        return max(len(e) for e in self.encodings)

    def set_encodings(self, encodings: list[Encoding]) -> None:
        self.encodings = encodings
        self.length_guess = None


def _guess(chars: Iterable[int], max_length: int) -> int:
    """A padded length from the longest input's characters: ~4 characters per token in English
    subword vocabularies, plus [CLS]/[SEP]."""
    return min(max_length, max(chars, default=0) // 4 + 2)


@dataclass(frozen=True)
class OutputTensor:
    """A V2 output: ``data`` is numeric, or an object array of str for BYTES."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


class EncoderResult:
    """What a task returns for one request, in the shape each protocol asks for.

    ``predictions`` (V1, one per instance) and ``outputs`` (V2 tensors, also what OpenAI
    embeddings read) are each given as a value or as a function that builds it; a function
    runs on first use only, so a request pays for its own protocol's shape alone (a V1 request
    never JSON-encodes V2 BYTES tensors, a V2 or embeddings request never turns vectors into
    Python lists).
    """

    __slots__ = ("_outputs", "_predictions", "token_count")

    def __init__(
        self,
        predictions: list[Any] | Callable[[], list[Any]],
        outputs: list[OutputTensor] | Callable[[], list[OutputTensor]],
        token_count: int = 0,
    ) -> None:
        self._predictions = predictions
        self._outputs = outputs
        self.token_count = token_count  # input tokens, set by the service

    @property
    def predictions(self) -> list[Any]:
        if callable(self._predictions):
            self._predictions = self._predictions()
        return self._predictions

    @property
    def outputs(self) -> list[OutputTensor]:
        if callable(self._outputs):
            self._outputs = self._outputs()
        return self._outputs


@dataclass(frozen=True)
class TaskContext:
    tokenizer: TextTokenizer
    info: ModelInfo
    options: EncoderOptions


class EncoderTask(ABC):
    """Pre- and post-processing of one encoder task around a numpy forward pass."""

    task: ClassVar[Task]
    # True when the model output has a sequence axis ([N, L, ...]) to trim per request.
    sequence_output: ClassVar[bool] = True
    # Which model output the backend returns: "logits" or "last_hidden_state".
    model_output: ClassVar[str] = "logits"

    def validate(self, request: EncodedRequest, ctx: TaskContext) -> None:  # noqa: B027
        """Reject requests the task cannot answer (before they reach the model)."""

    @abstractmethod
    def postprocess(
        self, outputs: FloatArray, request: EncodedRequest, ctx: TaskContext
    ) -> EncoderResult:
        """``outputs``: this request's rows, trimmed to its own padded length."""

    @abstractmethod
    def output_metadata(self, ctx: TaskContext) -> list[tuple[str, str, list[int]]]:
        """(name, datatype, shape) of each V2 output, -1 for variable axes."""


def softmax(x: FloatArray, axis: int = -1) -> FloatArray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e / e.sum(axis=axis, keepdims=True), dtype=np.float32)


def sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float32)


def json_bytes_tensor(
    name: str, values: list[Any], shape: tuple[int, ...] | None = None
) -> OutputTensor:
    """Objects as a BYTES tensor of JSON strings (KServe's encoding of dict outputs)."""
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        arr[i] = json.dumps(value, separators=(",", ":"))
    if shape is not None:
        arr = arr.reshape(shape)
    return OutputTensor(name, "BYTES", arr)


def raw_logits_result(outputs: FloatArray) -> EncoderResult:
    data = outputs.astype(np.float32)
    return EncoderResult(data.tolist, [OutputTensor("output-0", "FP32", data)])


def round4(value: float) -> float:
    return round(float(value), 4)
