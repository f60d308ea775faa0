"""Admission control: a bounded number of requests per model, and a way to wait for none.

A model runs ``running_slots`` units of work at once (an encoder's batches in flight, a
generator's sequences) and holds at most ``max_queued`` more waiting. A request beyond that is
refused at once with ``Overloaded`` (429 + Retry-After) instead of queueing without bound, so
memory stays bounded under a flood and clients learn early when to come back.

Weights: a generation request counts one unit per sequence it starts (prompts x n); an
encoder request counts one. A request heavier than the whole capacity is still admitted when
the model is idle, so a legal request is never refused for good.

The gate also counts what is in flight, which graceful shutdown waits on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from lmserve_core.errors import Overloaded

# Weight of the newest request duration in the running mean used for Retry-After.
_EWMA_ALPHA = 0.2
MAX_RETRY_AFTER_S = 60


class Ticket:
    """One admitted request; ``release()`` (idempotent) gives its units back."""

    __slots__ = ("_gate", "_on_release", "_released", "_started", "weight")

    def __init__(
        self, gate: AdmissionGate, weight: int, on_release: Callable[[], None] | None = None
    ) -> None:
        self._gate = gate
        self.weight = weight
        self._started = time.monotonic()
        self._released = False
        self._on_release = on_release

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._release(self.weight, time.monotonic() - self._started)
            if self._on_release is not None:
                self._on_release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdmissionGate:
    def __init__(self, *, running_slots: int, max_queued: int) -> None:
        if running_slots < 1 or max_queued < 0:
            raise ValueError("running_slots must be >= 1 and max_queued >= 0")
        self.running_slots = running_slots
        self.max_queued = max_queued
        self.in_flight = 0  # units
        self.requests = 0  # admitted requests not yet released
        self.rejected = 0
        self._mean_seconds: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def capacity(self) -> int:
        return self.running_slots + self.max_queued

    @property
    def queued(self) -> int:
        """Units waiting beyond those that can run now."""
        return max(0, self.in_flight - self.running_slots)

    def admit(self, weight: int = 1, on_release: Callable[[], None] | None = None) -> Ticket:
        """A ticket for a request of ``weight`` units, or ``Overloaded``; ``on_release`` runs
        when the ticket is released (an adapter's lease)."""
        weight = max(1, weight)
        if self.in_flight and self.in_flight + weight > self.capacity:
            self.rejected += 1
            raise Overloaded(
                f"the server is overloaded: {self.in_flight} requests' work in flight, the limit "
                f"is {self.capacity} ({self.running_slots} running + --max_queued_requests "
                f"{self.max_queued}); retry later",
                retry_after=self.retry_after(),
            )
        self.in_flight += weight
        self.requests += 1
        self._idle.clear()
        return Ticket(self, weight, on_release)

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely moved by one request's worth."""
        if self._mean_seconds is None:
            return 1
        rounds = (self.queued + 1) / self.running_slots
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._mean_seconds * rounds)))

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight, False if ``timeout`` s pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _release(self, weight: int, seconds: float) -> None:
        self.in_flight -= weight
        self.requests -= 1
        mean = self._mean_seconds
        self._mean_seconds = seconds if mean is None else mean + _EWMA_ALPHA * (seconds - mean)
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()
