"""lmserve_core.batching.DynamicBatcher: merging, limits, errors, shutdown, threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from lmserve_core import BackendError, InvalidInput, ModelNotReady
from lmserve_core.batching import DynamicBatcher

WAIT_S = 10.0  # upper bound on waits for the other thread; never asserted on


@dataclass(frozen=True)
class Item:
    name: str
    size: int = 1
    seq_len: int = 1


class Recorder:
    """A run_batch that records its calls; calls listed in ``block`` wait for a release."""

    def __init__(
        self,
        *,
        block: Sequence[int] = (),
        fail: dict[int, BaseException] | None = None,
        result: Callable[[Item], Any] = lambda item: f"result:{item.name}",
    ) -> None:
        self.batches: list[list[str]] = []
        self.threads: list[int] = []
        self.started = {n: threading.Event() for n in block}
        self.release = {n: threading.Event() for n in block}
        self.fail = fail or {}
        self.result = result

    def __call__(self, items: Sequence[Item]) -> list[Any]:
        call = len(self.batches)
        self.batches.append([i.name for i in items])
        self.threads.append(threading.get_ident())
        if call in self.started:
            self.started[call].set()
            if not self.release[call].wait(WAIT_S):
                raise RuntimeError("the test never released this batch")
        if call in self.fail:
            raise self.fail[call]
        return [self.result(i) for i in items]

    def release_all(self) -> None:
        for event in self.release.values():
            event.set()


async def _until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate`` holds (fails the test if it never does)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.001)


async def _queued(batcher: DynamicBatcher[Item, Any], n: int) -> None:
    await _until(lambda: batcher.queued == n)


async def _started(recorder: Recorder, call: int) -> None:
    assert await asyncio.to_thread(recorder.started[call].wait, WAIT_S)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_results_match_items() -> None:
    recorder = Recorder()

    async def main() -> list[Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=8)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(Item(str(i))) for i in range(20)))
        finally:
            await batcher.stop()

    assert run(main) == [f"result:{i}" for i in range(20)]
    # Every item ran exactly once.
    assert sorted(n for batch in recorder.batches for n in batch) == sorted(map(str, range(20)))


class SizeRecorder:
    """A ServingObserver keeping the batch sizes and queue times it is told."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.waits: list[float] = []

    def batch(self, instances: int) -> None:
        self.sizes.append(instances)

    def queue_time(self, seconds: float, *, model: str | None = None) -> None:
        self.waits.append(seconds)

    def decode_step(self, sequences: int) -> None:
        raise AssertionError("an encoder batcher decodes nothing")

    def forward_pass(self, seconds: float) -> None:
        raise AssertionError("the encoder service times forward passes, not the batcher")

    def first_token(self, seconds: float, *, model: str | None = None) -> None: ...

    def inter_token(self, seconds: float, *, model: str | None = None) -> None: ...

    def tokens(self, prompt: int, generated: int, *, model: str | None = None) -> None: ...


def test_requests_arriving_during_a_batch_are_merged_into_the_next() -> None:
    recorder = Recorder(block=[0])
    sizes: list[int] = []

    async def main() -> list[Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(
            recorder, max_batch_size=32, observer=SizeRecorder(sizes)
        )
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            later = [asyncio.ensure_future(batcher.submit(Item(f"n{i}"))) for i in range(5)]
            await _until(lambda: batcher.queued == 5)
            recorder.release_all()
            return await asyncio.gather(first, *later)
        finally:
            recorder.release_all()
            await batcher.stop()

    results = run(main)
    assert results == ["result:first"] + [f"result:n{i}" for i in range(5)]
    assert recorder.batches == [["first"], ["n0", "n1", "n2", "n3", "n4"]]
    assert sizes == [1, 5]


def test_batcher_counts_batches_run() -> None:
    recorder = Recorder()

    async def main() -> int:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=4)
        await batcher.start()
        try:
            await batcher.submit(Item("a"))
            await batcher.submit(Item("b"))
            return batcher.batches_run
        finally:
            await batcher.stop()

    assert run(main) == 2


def test_max_batch_size_counts_item_sizes() -> None:
    items = [Item("a", 2), Item("b", 2), Item("c", 1), Item("d", 3), Item("e", 1),
             Item("big", 9), Item("f", 1)]  # fmt: skip
    results, recorder = _queue_then_release(items, max_batch_size=4)
    assert results == [f"result:{n}" for n in ["first", "a", "b", "c", "d", "e", "big", "f"]]
    # Items that fit are packed past one that does not ("f" joins "e"); an oversized item
    # runs alone rather than never.
    assert recorder.batches == [["first"], ["a", "b"], ["c", "d"], ["e", "f"], ["big"]]


def test_run_batch_runs_off_the_event_loop_thread() -> None:
    recorder = Recorder()

    async def main() -> int:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=4)
        await batcher.start()
        try:
            await batcher.submit(Item("a"))
            await batcher.submit(Item("b"))
        finally:
            await batcher.stop()
        return threading.get_ident()

    loop_thread = run(main)
    assert len(recorder.threads) == 2
    assert loop_thread not in recorder.threads
    assert len(set(recorder.threads)) == 1  # one dedicated model thread


def test_event_loop_stays_responsive_during_a_batch() -> None:
    recorder = Recorder(block=[0])

    async def main() -> bool:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=4)
        await batcher.start()
        try:
            pending = asyncio.ensure_future(batcher.submit(Item("a")))
            await _started(recorder, 0)
            # The loop is free: other coroutines run while the model works.
            await asyncio.sleep(0)
            still_running = not pending.done()
            recorder.release_all()
            await pending
            return still_running
        finally:
            recorder.release_all()
            await batcher.stop()

    assert run(main) is True


def test_exception_fails_only_its_batch_and_the_batcher_keeps_working() -> None:
    recorder = Recorder(block=[0], fail={1: RuntimeError("CUDA out of memory")})

    async def main() -> tuple[Any, list[BaseException | Any], Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=8)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            doomed = [asyncio.ensure_future(batcher.submit(Item(f"d{i}"))) for i in range(3)]
            await _until(lambda: batcher.queued == 3)
            recorder.release_all()
            ok = await first
            failed = await asyncio.gather(*doomed, return_exceptions=True)
            after = await batcher.submit(Item("after"))
            return ok, failed, after
        finally:
            recorder.release_all()
            await batcher.stop()

    ok, failed, after = run(main)
    assert ok == "result:first"
    assert len(failed) == 3
    for exc in failed:
        assert isinstance(exc, BackendError)
        assert "CUDA out of memory" in exc.message
    assert after == "result:after"
    assert recorder.batches == [["first"], ["d0", "d1", "d2"], ["after"]]


def test_lmserve_errors_propagate_as_is() -> None:
    error = InvalidInput("bad token ids", param="input")
    recorder = Recorder(fail={0: error})

    async def main() -> tuple[BaseException, Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=8)
        await batcher.start()
        try:
            with pytest.raises(InvalidInput) as info:
                await batcher.submit(Item("a"))
            return info.value, await batcher.submit(Item("b"))
        finally:
            await batcher.stop()

    raised, after = run(main)
    assert raised is error
    assert not isinstance(raised, BackendError)
    assert after == "result:b"


def test_wrong_number_of_results_is_a_backend_error_and_not_fatal() -> None:
    calls = {"n": 0}

    def run_batch(items: Sequence[Item]) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            return []  # a buggy backend: no result for the item
        return [i.name for i in items]

    async def main() -> Any:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(run_batch, max_batch_size=8)
        await batcher.start()
        try:
            with pytest.raises(BackendError):
                await asyncio.wait_for(batcher.submit(Item("a")), WAIT_S)
            return await asyncio.wait_for(batcher.submit(Item("b")), WAIT_S)
        finally:
            await batcher.stop()

    assert run(main) == "b"


def test_submit_before_start_and_after_stop() -> None:
    async def main() -> None:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(Recorder(), max_batch_size=2)
        with pytest.raises(ModelNotReady):
            await batcher.submit(Item("early"))
        await batcher.start()
        assert await batcher.submit(Item("ok")) == "result:ok"
        await batcher.stop()
        with pytest.raises(ModelNotReady):
            await batcher.submit(Item("late"))

    run(main)


def test_stop_fails_waiting_requests_with_model_not_ready() -> None:
    # Call 1 blocks with a carried-over item waiting, so stop() meets the running batch,
    # the carry and queued items at once.
    recorder = Recorder(block=[0, 1])

    async def main() -> list[BaseException | Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=2)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            queued = []
            for item in [Item("a", 2), Item("carry", 1), Item("q1"), Item("q2")]:
                queued.append(asyncio.ensure_future(batcher.submit(item)))
                await _queued(batcher, len(queued))
            recorder.release[0].set()
            assert await first == "result:first"
            await _started(recorder, 1)  # batch ["a"] runs; "carry" waits as the carry
            await batcher.stop()
            return await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), WAIT_S)
        finally:
            recorder.release_all()
            await batcher.stop()

    results = run(main)
    assert recorder.batches == [["first"], ["a"]]
    assert len(results) == 4
    # The queued and carried requests, and the one whose batch was cut off, all fail.
    for exc in results:
        assert isinstance(exc, ModelNotReady), exc


def test_cancelled_request_is_not_run() -> None:
    recorder = Recorder(block=[0])

    async def main() -> Any:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, max_batch_size=8)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            gone = asyncio.ensure_future(batcher.submit(Item("gone")))
            kept = asyncio.ensure_future(batcher.submit(Item("kept")))
            await _until(lambda: batcher.queued == 2)
            gone.cancel()
            recorder.release_all()
            await first
            return await kept
        finally:
            recorder.release_all()
            await batcher.stop()

    assert run(main) == "result:kept"
    assert recorder.batches == [["first"], ["kept"]]


def test_concurrency_keeps_several_batches_in_flight_and_merges_the_rest() -> None:
    """concurrency=2: a second batch starts while the first is still running; what arrives
    while both run is merged into the third."""
    recorder = Recorder(block=[0, 1])

    async def main() -> list[Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(
            recorder, max_batch_size=32, concurrency=2
        )
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            second = asyncio.ensure_future(batcher.submit(Item("second")))
            await _started(recorder, 1)  # runs although batch 0 has not finished
            later = [asyncio.ensure_future(batcher.submit(Item(f"n{i}"))) for i in range(3)]
            await _queued(batcher, 3)
            recorder.release[1].set()
            assert await second == "result:second"
            recorder.release[0].set()
            return await asyncio.gather(first, *later)
        finally:
            recorder.release_all()
            await batcher.stop()

    results = run(main)
    assert results == ["result:first", "result:n0", "result:n1", "result:n2"]
    assert recorder.batches == [["first"], ["second"], ["n0", "n1", "n2"]]
    assert len(set(recorder.threads[:2])) == 2  # the two overlapping batches ran on two threads


def test_stop_fails_every_batch_in_flight() -> None:
    recorder = Recorder(block=[0, 1])

    async def main() -> list[BaseException | Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(
            recorder, max_batch_size=8, concurrency=2
        )
        await batcher.start()
        try:
            running = [asyncio.ensure_future(batcher.submit(Item("a")))]
            await _started(recorder, 0)
            running.append(asyncio.ensure_future(batcher.submit(Item("b"))))
            await _started(recorder, 1)
            await batcher.stop()
            return await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), WAIT_S)
        finally:
            recorder.release_all()

    for result in run(main):
        assert isinstance(result, ModelNotReady), result


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        DynamicBatcher(Recorder(), max_batch_size=8, concurrency=0)


def _queue_then_release(items: Sequence[Item], **options: Any) -> tuple[list[Any], Recorder]:
    """Block the model on a first item, queue ``items`` in order, then let everything run."""
    recorder = Recorder(block=[0])

    async def main() -> list[Any]:
        batcher: DynamicBatcher[Item, Any] = DynamicBatcher(recorder, **options)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(Item("first")))
            await _started(recorder, 0)
            later = []
            for item in items:
                later.append(asyncio.ensure_future(batcher.submit(item)))
                await _queued(batcher, len(later))
            recorder.release_all()
            return await asyncio.gather(first, *later)
        finally:
            recorder.release_all()
            await batcher.stop()

    return run(main), recorder


def test_waiting_requests_are_grouped_by_length_oldest_first() -> None:
    """The oldest waiting request anchors each batch; the rest are the closest lengths."""
    items = [Item("l100", seq_len=100), Item("s10", seq_len=10), Item("l120", seq_len=120),
             Item("s12", seq_len=12), Item("s8", seq_len=8), Item("l90", seq_len=90)]  # fmt: skip
    results, recorder = _queue_then_release(items, max_batch_size=3)
    assert results == ["result:first"] + [f"result:{i.name}" for i in items]
    assert recorder.batches == [["first"], ["l100", "l90", "l120"], ["s10", "s12", "s8"]]


def test_token_budget_caps_instances_times_the_longest_length() -> None:
    items = [Item("a", size=2, seq_len=50), Item("b", size=2, seq_len=50),
             Item("c", size=1, seq_len=200), Item("d", size=1, seq_len=40)]  # fmt: skip
    results, recorder = _queue_then_release(items, max_batch_size=32, max_batch_tokens=250)
    assert results == ["result:first"] + [f"result:{i.name}" for i in items]
    # a+b: 4 x 50 = 200 fits; d would make 5 x 50 = 250, fits; c alone (200) is over with any
    # other item and runs by itself.
    assert recorder.batches == [["first"], ["a", "b", "d"], ["c"]]
