"""The tensor contract between lmserve and a Triton model (docs/behaviour.md §6), in one vocabulary.

``lmserve export`` prints it after writing ``config.pbtxt``; transformer mode shows it in
``GET /v2/models/{name}`` (``parameters.predictor_inputs`` / ``predictor_outputs``) and checks
it against Triton's own model metadata at startup. Both sides describe a tensor the way
Triton's model metadata (``GET /v2/models/{name}`` on Triton) does:

- ``datatype`` is Triton's name (``INT64``, ``FP32``), i.e. config.pbtxt's ``data_type``
  without its ``TYPE_`` prefix;
- ``shape`` includes the batch axis and uses -1 for a dynamic axis. With
  ``max_batch_size`` > 0 (what ``lmserve export`` writes), config.pbtxt's ``dims`` are this
  shape without its first (batch) axis.

No heavy imports: this module is loaded by transformer mode, which never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lmserve_core.encoder import ModelInfo
from lmserve_core.errors import ConfigurationError
from lmserve_core.tasks import Task

if TYPE_CHECKING:
    from lmserve_backend_hf.encoder_info import EncoderParts

__all__ = [
    "DYNAMIC",
    "TritonTensor",
    "config_data_type",
    "describe_tensors",
    "expected_output",
    "reranker_graph_parts",
    "reranker_needs_token_types",
    "token_inputs",
]

DYNAMIC = -1
# Triton's model-metadata datatype -> config.pbtxt data_type (the ones that differ by more
# than the prefix: BYTES is TYPE_STRING there).
_CONFIG_TYPES = {"BYTES": "TYPE_STRING"}


def config_data_type(datatype: str) -> str:
    """``INT64`` -> ``TYPE_INT64`` (config.pbtxt's spelling of a metadata datatype)."""
    return _CONFIG_TYPES.get(datatype, f"TYPE_{datatype}")


@dataclass(frozen=True)
class TritonTensor:
    """One input or output tensor as Triton's model metadata shows it."""

    name: str
    datatype: str  # Triton's: INT64, INT32, FP32 ...
    shape: tuple[int, ...]  # with the batch axis; -1 = dynamic

    def config_dims(self, max_batch_size: int) -> tuple[int, ...]:
        """config.pbtxt's ``dims``: Triton adds the batch axis itself when batching is on."""
        return self.shape[1:] if max_batch_size > 0 else self.shape

    def as_dict(self) -> dict[str, Any]:
        """The V2 metadata form: ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {_shape(self.shape)}"


def token_inputs(names: Sequence[str], datatype: str = "INT64") -> tuple[TritonTensor, ...]:
    """Tokenizer outputs as lmserve sends them: [batch, padded sequence length], both dynamic."""
    return tuple(TritonTensor(n, datatype, (DYNAMIC, DYNAMIC)) for n in names)


def expected_output(task: Task, info: ModelInfo, name: str, datatype: str = "FP32") -> TritonTensor:
    """The output lmserve post-processes for ``task``, sized from the model's config.json:
    ``[batch, classes]`` for sequence classification, ``[batch, 1]`` for a reranker (one logit
    per pair: ``lmserve_core.model_files.check_reranker``), ``[batch, sequence, last]`` otherwise (last =
    labels, vocabulary or hidden size); -1 where the config does not say."""
    if task is Task.sequence_classification:
        return TritonTensor(name, datatype, (DYNAMIC, len(info.id2label) or DYNAMIC))
    if task is Task.rerank:
        return TritonTensor(name, datatype, (DYNAMIC, 1))
    last = {
        Task.token_classification: len(info.id2label) or None,
        Task.fill_mask: info.vocab_size,
        Task.text_embedding: info.hidden_size,
    }.get(task)
    return TritonTensor(name, datatype, (DYNAMIC, DYNAMIC, int(last) if last else DYNAMIC))


def reranker_needs_token_types(config: Mapping[str, Any], pair_type_ids: Sequence[int]) -> bool:
    """Whether a cross-encoder's graph must take ``token_type_ids``: its tokenizer marks the
    document of a pair with type 1 (``pair_type_ids``: one pair's, specials included) and the
    model has an embedding for more than one type (BERT's ``type_vocab_size`` 2).
    ``CrossEncoder.predict`` then sends them, and a graph without them scores every pair as one
    segment: other scores than the model's."""
    types = config.get("type_vocab_size")
    return isinstance(types, int) and types > 1 and 1 in pair_type_ids


def missing_token_types(name: str, input_names: Sequence[str]) -> ConfigurationError:
    """Why a reranker graph without ``token_type_ids`` is refused rather than served."""
    return ConfigurationError(
        f"{name!r} is a cross-encoder that tells the query from the document by token types, "
        f"but the graph's inputs ({','.join(input_names)}) leave out token_type_ids: every pair "
        "would score as one segment, not as the model scores it. Add token_type_ids to "
        "--tensor_input_names (and to the exported graph: lmserve export --tensor_input_names "
        "input_ids,attention_mask,token_type_ids)",
        param="tensor_input_names",
    )


def reranker_graph_parts(
    parts: EncoderParts, config: Mapping[str, Any], name: str, *, names_given: bool
) -> EncoderParts:
    """A reranker graph's inputs (ONNX Runtime's, Triton's): ``token_type_ids`` are added when
    the model needs them (``reranker_needs_token_types``) and ``--tensor_input_names`` was not
    given; given without them, the model is refused (``missing_token_types``): a reranker
    serving other scores than its model's is worse than one that does not start."""
    if "token_type_ids" in parts.input_names:
        return parts
    (pair,) = parts.tokenizer.encode_pairs(
        [("query", "document")], add_special_tokens=True, max_length=None
    )
    if not reranker_needs_token_types(config, pair.type_ids):
        return parts
    if names_given:
        raise missing_token_types(name, parts.input_names)
    return replace(
        parts,
        input_names=[*parts.input_names, "token_type_ids"],
        options=replace(parts.options, return_token_type_ids=True),
    )


def describe_tensors(
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    max_batch_size: int | None = None,
) -> list[str]:
    """Aligned lines ``input  NAME  DATATYPE  SHAPE`` (and config.pbtxt's ``dims`` when
    ``max_batch_size`` is known), one per tensor."""
    rows = [("input", t) for t in inputs] + [("output", t) for t in outputs]
    name_width = max((len(t.name) for _, t in rows), default=0)
    type_width = max((len(t.datatype) for _, t in rows), default=0)
    shape_width = max((len(_shape(t.shape)) for _, t in rows), default=0)
    lines = []
    for kind, t in rows:
        line = f"{kind:<6}  {t.name:<{name_width}}  {t.datatype:<{type_width}}  "
        if max_batch_size is None:
            lines.append((line + _shape(t.shape)).rstrip())
        else:
            dims = "[ " + ", ".join(str(d) for d in t.config_dims(max_batch_size)) + " ]"
            lines.append(f"{line}{_shape(t.shape):<{shape_width}}  config.pbtxt dims {dims}")
    return lines


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
