"""Batches from several API workers merged into one forward pass in the model's process.

Each worker batches only its own requests, so N workers send N smaller batches where one
process would have run one: on a small encoder each pass has a fixed cost (the tiny BERT's
batch-1 pass takes as long as six rows of a batch of 32; BENCHMARKS.md), so batches that wait
while the model is busy go through together, as one process's batcher would have merged their
requests. A batch joins only when that adds little padding (``MAX_EXTRA_PADDING``), the rule
the encoder service uses for its length-sorted chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lmserve_core.backend import IN_PROCESS_BATCH_SIZE
from lmserve_core.errors import BackendError

Batch = Mapping[str, np.ndarray]

# Padded tokens of a merged pass may exceed the batches' own by at most this fraction.
MAX_EXTRA_PADDING = 0.1
# Rows of one merged pass: the in-process backends' batch size.
MAX_ROWS = IN_PROCESS_BATCH_SIZE


def rows_and_length(batch: Batch) -> tuple[int, int]:
    rows, length = batch["input_ids"].shape
    return int(rows), int(length)


def mergeable(group: Sequence[Batch], candidate: Batch) -> bool:
    """``candidate`` may join ``group``: the same tensors, room left, little padding added."""
    if set(candidate) != set(group[0]):
        return False
    sizes = [rows_and_length(b) for b in (*group, candidate)]
    rows = sum(n for n, _ in sizes)
    own = sum(n * length for n, length in sizes)
    merged = rows * max(length for _, length in sizes)
    return rows <= MAX_ROWS and merged <= (1 + MAX_EXTRA_PADDING) * own


def merge(batches: Sequence[Batch], *, pad_id: int) -> dict[str, np.ndarray]:
    """One batch, right-padded to the longest: ``input_ids`` with ``pad_id``, the rest (the
    attention mask, token types) with 0, so padded positions are masked as in any batch."""
    if len(batches) == 1:
        return dict(batches[0])
    length = max(rows_and_length(b)[1] for b in batches)
    out = {}
    for name in batches[0]:
        fill = pad_id if name == "input_ids" else 0
        parts = []
        for batch in batches:
            array = batch[name]
            if array.ndim != 2:
                raise BackendError(f"forward channel: {name} is not a [rows, length] array")
            parts.append(np.pad(array, ((0, 0), (0, length - array.shape[1])),
                                constant_values=fill))  # fmt: skip
        out[name] = np.concatenate(parts)
    return out


def split(output: np.ndarray, batches: Sequence[Batch]) -> list[np.ndarray]:
    """Each batch's rows of a merged pass's ``output``; per-token outputs ([rows, length, ...])
    cut back to the batch's own length, as if it had run alone."""
    if len(batches) == 1:
        return [output]
    sizes = [rows_and_length(b) for b in batches]
    if output.shape[0] != sum(n for n, _ in sizes):
        raise BackendError(
            f"the model returned {output.shape[0]} rows for {sum(n for n, _ in sizes)} inputs"
        )
    longest = max(length for _, length in sizes)
    per_token = output.ndim >= 3 and output.shape[1] == longest
    parts, row = [], 0
    for n, length in sizes:
        part = output[row : row + n]
        parts.append(np.ascontiguousarray(part[:, :length]) if per_token else part)
        row += n
    return parts
