"""freeze_startup_heap: what is alive after the model loads is left out of garbage collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from lmserve_server.heap import freeze_startup_heap


@pytest.fixture
def unfrozen_afterwards() -> Iterator[None]:
    yield
    gc.unfreeze()  # back to the oldest generation: the rest of the test run collects as before


@pytest.mark.usefixtures("unfrozen_afterwards")
def test_freezes_what_is_alive_and_collects_what_is_not() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    kept = [Node() for _ in range(1000)]
    garbage = Node()
    garbage_alive = weakref.ref(garbage)
    del garbage
    frozen_before = gc.get_freeze_count()

    freeze_startup_heap()

    assert gc.get_freeze_count() >= frozen_before + len(kept)
    # Collected first: the unreachable cycle was freed, not frozen for the life of the process.
    assert garbage_alive() is None
    assert all(node.me is node for node in kept)
