"""AdmissionGate: bounded work per model, Retry-After from observed durations, idle waits."""

from __future__ import annotations

import asyncio

import pytest

from lmserve_core.admission import MAX_RETRY_AFTER_S, AdmissionGate
from lmserve_core.errors import Overloaded


def test_admits_up_to_running_plus_queued_then_refuses() -> None:
    gate = AdmissionGate(running_slots=2, max_queued=1)
    tickets = [gate.admit() for _ in range(3)]
    assert gate.in_flight == 3 and gate.queued == 1
    with pytest.raises(Overloaded) as info:
        gate.admit()
    assert "--max_queued_requests 1" in info.value.message
    assert info.value.retry_after >= 1
    assert gate.rejected == 1
    tickets[0].release()
    tickets[0].release()  # idempotent: gives back its unit once
    assert gate.in_flight == 2
    gate.admit()  # room again


def test_weights_count_sequences() -> None:
    gate = AdmissionGate(running_slots=4, max_queued=0)
    gate.admit(3)
    with pytest.raises(Overloaded):
        gate.admit(2)
    gate.admit(1)
    assert gate.in_flight == 4 and gate.requests == 2


def test_a_request_heavier_than_the_capacity_runs_when_idle() -> None:
    gate = AdmissionGate(running_slots=1, max_queued=0)
    with gate.admit(10):
        assert gate.in_flight == 10
        with pytest.raises(Overloaded):
            gate.admit(1)
    assert gate.in_flight == 0


def test_retry_after_follows_observed_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("lmserve_core.admission.time.monotonic", lambda: clock[0])
    gate = AdmissionGate(running_slots=1, max_queued=3)
    assert gate.retry_after() == 1  # nothing observed yet
    ticket = gate.admit()
    clock[0] += 4.0
    ticket.release()
    held = [gate.admit() for _ in range(4)]  # 1 running, 3 queued
    with pytest.raises(Overloaded) as info:
        gate.admit()
    # 3 queued + this one, one at a time, ~4 s each.
    assert info.value.retry_after == 16
    for t in held:
        t.release()
    slow = gate.admit()
    clock[0] += 10_000
    slow.release()
    assert gate.retry_after() == MAX_RETRY_AFTER_S


def test_wait_idle() -> None:
    async def scenario() -> None:
        gate = AdmissionGate(running_slots=1, max_queued=1)
        assert await gate.wait_idle(0.01)
        ticket = gate.admit()
        assert not await gate.wait_idle(0.01)
        asyncio.get_running_loop().call_later(0.02, ticket.release)
        assert await gate.wait_idle(2)

    asyncio.run(scenario())


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        AdmissionGate(running_slots=0, max_queued=1)
    with pytest.raises(ValueError):
        AdmissionGate(running_slots=1, max_queued=-1)
