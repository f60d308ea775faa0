"""Measurements taken in alternating rounds, so that the box's drifting load (two shared cores)
falls on both sides of a ratio alike.

Each round measures every arm once, back to back; odd rounds run the arms in the reverse
order (A B, B A, A B, ...). The ratio is taken within a round and the median over rounds is
reported. ``lora.py``, ``structured_outputs.py`` and ``rerank.py`` use it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


def alternating_rounds(
    arms: Sequence[tuple[str, Callable[[], Any]]],
    rounds: int,
    ratio: Callable[[Row], float],
    report: Callable[[int, Row], None] | None = None,
) -> dict[str, Any]:
    """``{"rounds": [row, ...], "median_ratio": float}``: in each row every arm's name maps to
    what its measure returned (in the order they ran) and ``"ratio"`` to ``ratio(row)``.
    ``report(round_number, row)`` (from 1) is called after each round."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    rows: list[Row] = []
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        row: Row = {}
        for name, measure in order:
            row[name] = measure()
        row["ratio"] = ratio(row)
        rows.append(row)
        if report is not None:
            report(r + 1, row)
    return {"rounds": rows, "median_ratio": statistics.median(row["ratio"] for row in rows)}
