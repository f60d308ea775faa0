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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmserve_core.encoder import ModelInfo
from lmserve_core.tasks import Task

__all__ = [
    "DYNAMIC",
    "TritonTensor",
    "config_data_type",
    "describe_tensors",
    "expected_output",
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
    ``[batch, classes]`` for sequence classification, ``[batch, sequence, last]`` otherwise
    (last = labels, vocabulary or hidden size); -1 where the config does not say."""
    if task is Task.sequence_classification:
        return TritonTensor(name, datatype, (DYNAMIC, len(info.id2label) or DYNAMIC))
    last = {
        Task.token_classification: len(info.id2label) or None,
        Task.fill_mask: info.vocab_size,
        Task.text_embedding: info.hidden_size,
    }.get(task)
    return TritonTensor(name, datatype, (DYNAMIC, DYNAMIC, int(last) if last else DYNAMIC))


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
