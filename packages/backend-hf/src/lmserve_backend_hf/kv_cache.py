"""A KV cache that grows in place, for the engine's shared decoding batch.

transformers' ``DynamicLayer`` appends a decoding step's key and value with ``torch.cat``, which
copies the whole cache (every row, every position) on every step of every layer; the engine's
joins and leaves re-concatenated it too. Here each layer's keys and values live in buffers with
spare room along the batch and the time axes (amortised doubling); the model is handed views of
the filled part, a step writes one column, a joining group is copied into free rows, and a
leaving row is replaced by a row from the end (only the moved rows are copied). Dropping leading
padding columns moves the window's start, which copies nothing.

Layout as the engine's: [B, H, T, D], rows left-padded to the window's width (the attention mask
says which positions are real). Positions the model can see are always written (copied keys, or
zeros for padding), so spare room may stay uninitialised.
"""

from __future__ import annotations

from collections.abc import Sequence

# Imported only by the engine, itself imported inside create_backend (as engine.py's imports).
import torch
from transformers.cache_utils import DynamicLayer

# The smallest time capacity allocated; a decoding batch appends one column per step.
_MIN_TIME_CAPACITY = 16


class GrowingTensor:
    """A [B, H, T, D] tensor that grows along B (new rows) and T (appended positions) in place:
    ``view`` is ``data[:rows, :, start:end]``."""

    __slots__ = ("_data", "end", "rows", "start", "view")

    def __init__(self, initial: torch.Tensor) -> None:
        if initial.dim() != 4:
            raise ValueError(f"expected a [B, H, T, D] tensor, got shape {tuple(initial.shape)}")
        rows, width = initial.shape[0], initial.shape[2]
        self._data = initial.new_empty(
            (rows, initial.shape[1], max(2 * width, _MIN_TIME_CAPACITY), initial.shape[3])
        )
        self._data[:, :, :width].copy_(initial)
        self.rows, self.start, self.end = rows, 0, width
        self._refresh()

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the buffer holds before it has to be reallocated."""
        return self._data.shape[0], self._data.shape[2]

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Write ``states`` [rows, H, n, D] after the last position; the new view."""
        n = states.shape[2]
        if self.end + n > self._data.shape[2]:
            self._reserve(self.rows, left=0, right=n)
        end = self.end + n
        self._data[: self.rows, :, self.end : end].copy_(states)
        self.end = end
        return self._refresh()

    def extend(self, states: torch.Tensor) -> None:
        """Add the rows of ``states`` [b, H, w, D] after the last row, both sides left-padded
        with zeros to the wider of the two."""
        b, w = states.shape[0], states.shape[2]
        wider = max(0, w - self.width)
        self._reserve(self.rows + b, left=wider, right=0)
        if wider:  # the rows already here get more left padding
            self._data[: self.rows, :, self.start - wider : self.start].zero_()
            self.start -= wider
        new = self._data[self.rows : self.rows + b]
        new[:, :, self.start : self.end - w].zero_()
        new[:, :, self.end - w : self.end].copy_(states)
        self.rows += b
        self._refresh()

    def select(self, rows: Sequence[int], trim: int = 0) -> None:
        """Keep the rows ``rows`` (row ``rows[j]`` becomes row j) and drop the first ``trim``
        positions. Only rows that change place are copied (see ``fill_holes``)."""
        moves = [(j, r) for j, r in enumerate(rows) if j != r]
        if moves:
            dst = torch.tensor([j for j, _ in moves], device=self._data.device)
            src = torch.tensor([r for _, r in moves], device=self._data.device)
            window = self._data[:, :, self.start : self.end]
            # index_select materialises the sources before any row is overwritten.
            window.index_copy_(0, dst, window.index_select(0, src))
        self.rows = len(rows)
        self.start += trim
        self._refresh()

    def _reserve(self, rows: int, *, left: int, right: int) -> None:
        """Room for ``rows`` rows, ``left`` positions before the window and ``right`` after it;
        reallocates (doubling, window copied to the left edge plus ``left``) when short."""
        cap_rows, cap_time = self.capacity
        if rows <= cap_rows and left <= self.start and self.end + right <= cap_time:
            return
        width = self.width
        new_rows = cap_rows if rows <= cap_rows else max(rows, 2 * cap_rows)
        new_time = max(2 * (left + width + right), _MIN_TIME_CAPACITY)
        data = self._data.new_empty((new_rows, self._data.shape[1], new_time, self._data.shape[3]))
        data[: self.rows, :, left : left + width].copy_(self.view)
        self._data, self.start, self.end = data, left, left + width
        self._refresh()

    def _refresh(self) -> torch.Tensor:
        self.view = self._data[: self.rows, :, self.start : self.end]
        return self.view


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are views of ``GrowingTensor`` buffers.

    The model only calls ``update`` (one write per step). Anything that assigns ``keys`` or
    ``values`` (transformers' crop, reorder, offload) still works: the new tensor is copied into
    a fresh buffer."""

    def __init__(self) -> None:
        self._k: GrowingTensor | None = None
        self._v: GrowingTensor | None = None
        super().__init__()  # type: ignore[no-untyped-call]

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> GrowingLayer:
        """A growing copy of a filled ``layer`` (one copy of its keys and values)."""
        assert layer.keys is not None and layer.values is not None
        grown = cls()
        grown.dtype, grown.device = layer.keys.dtype, layer.keys.device
        grown.keys, grown.values = layer.keys, layer.values
        grown.is_initialized = True
        return grown

    # keys / values: views of the buffers; assigning one copies it into a new buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k.view

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = _buffer(value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v.view

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = _buffer(value)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None or self._v is None:
            self.keys, self.values = key_states, value_states
            assert self._k is not None and self._v is not None
            return self._k.view, self._v.view
        return self._k.append(key_states), self._v.append(value_states)

    def get_seq_length(self) -> int:
        return 0 if self._k is None else self._k.width

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows (another group's cache of this layer), left-padded to the common width."""
        assert self._k is not None and self._v is not None
        self._k.extend(keys)
        self._v.extend(values)

    def select(self, rows: Sequence[int], trim: int = 0) -> None:
        """Keep ``rows`` in that order and drop the first ``trim`` positions."""
        assert self._k is not None and self._v is not None
        self._k.select(rows, trim)
        self._v.select(rows, trim)

    @property
    def capacity(self) -> tuple[int, int]:
        assert self._k is not None
        return self._k.capacity


def _buffer(value: torch.Tensor | None) -> GrowingTensor | None:
    # transformers' lazy initialisation assigns an empty 1-D tensor: nothing cached yet.
    if value is None or value.dim() != 4:
        return None
    return GrowingTensor(value)


def fill_holes(kept: Sequence[int]) -> list[int]:
    """The row order after a select that keeps the rows ``kept`` (ascending): rows that stay
    within the new batch keep their place, and each hole is filled from the rows beyond it, so
    only those are copied. ``result[j]`` is the old index of the new row j."""
    size = len(kept)
    stay = {r for r in kept if r < size}
    movers = iter(r for r in kept if r >= size)
    return [j if j in stay else next(movers) for j in range(size)]


def make_growing(cache: object) -> None:
    """Replace, in place, each plain ``DynamicLayer`` of ``cache`` (a ``DynamicCache``) by a
    ``GrowingLayer`` holding the same keys and values; layers already growing stay."""
    layers = cache.layers  # type: ignore[attr-defined]
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = GrowingLayer.adopt(layer)


__all__ = ["GrowingLayer", "GrowingTensor", "fill_holes", "make_growing"]
