"""A dynamic batcher: one model thread, requests merged while the model is busy.

No fixed wait: an idle model takes the first request at once; requests that arrive while
a forward pass runs are merged into the next one, up to ``max_batch_size`` instances and
``max_batch_tokens`` padded tokens (instances x the longest ``seq_len``). When more is waiting
than fits, the oldest request anchors the batch (so none starves) and the others are picked by
how close their length is to it, which cuts padding. The model function runs on a dedicated
thread, never on the event loop, so health checks and new requests are answered during a
forward pass.

``run_batch`` may answer an item with ``ItemError``: that one request fails, the others get
their results (the encoder tokenizes a batch on the model thread, and one text it cannot take
must not fail the batch).

``concurrency`` > 1 keeps that many batches in flight at once, each on its own thread: for a
remote predictor (Triton) the "forward pass" is mostly waiting on the network, and the next
batch can be on the wire while the previous one computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lmserve_core.errors import BackendError, LmserveError, ModelNotReady
from lmserve_core.observer import ServingObserver

logger = logging.getLogger(__name__)


class Sized(Protocol):
    @property
    def size(self) -> int: ...


def _seq_len(item: object) -> int:
    """Padded length of an item; items without one (not token sequences) count as 1."""
    value = getattr(item, "seq_len", 1)
    return value if isinstance(value, int) else 1


ItemT = TypeVar("ItemT", bound=Sized)
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class ItemError:
    """``run_batch``'s answer for one item that fails alone: its request gets ``error``."""

    error: LmserveError


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT] = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Runs ``run_batch(items) -> results`` (one result, or ``ItemError``, per item) on a
    model thread."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[ItemT]], Sequence[ResultT | ItemError]],
        *,
        max_batch_size: int,
        name: str = "model",
        concurrency: int = 1,
        max_batch_tokens: int | None = None,
        observer: ServingObserver | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._concurrency = concurrency
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix=f"lmserve-{name}"
        )
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        # Taken off the queue but not yet run (did not fit the last batch), oldest first.
        self._waiting: list[_Pending[ItemT, ResultT]] = []
        self.batches_run = 0
        self._observer = observer

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self._concurrency)
            self._task = asyncio.create_task(self._loop(), name="lmserve-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._fail_waiting(ModelNotReady("the model is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        """Requests waiting for a forward pass."""
        return (self._queue.qsize() if self._queue else 0) + len(self._waiting)

    async def submit(self, item: ItemT) -> ResultT:
        if self._queue is None or self._task is None:
            raise ModelNotReady("the model is not running")
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None and self._slots is not None
        while True:
            # Wait for a free slot first: requests keep queueing (and merging) meanwhile.
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            if self._concurrency == 1:
                await self._run(batch)
            else:
                task = asyncio.create_task(self._run(batch), name="lmserve-batch")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _next_batch(self) -> list[_Pending[ItemT, ResultT]]:
        assert self._queue is not None
        if not self._waiting:
            self._waiting.append(await self._queue.get())
        while not self._queue.empty():
            self._waiting.append(self._queue.get_nowait())
        self._waiting = [p for p in self._waiting if not p.future.done()]  # cancelled meanwhile
        if not self._waiting:
            return []
        anchor, *others = self._waiting
        length = _seq_len(anchor.item)
        # Closest lengths first; among equals the oldest (sorted() is stable).
        others.sort(key=lambda p: abs(_seq_len(p.item) - length))
        batch, size, longest = [anchor], anchor.item.size, length
        for pending in others:
            n, new_longest = pending.item.size, max(longest, _seq_len(pending.item))
            if size + n > self._max_batch_size:
                continue
            if self._max_batch_tokens and (size + n) * new_longest > self._max_batch_tokens:
                continue
            batch.append(pending)
            size, longest = size + n, new_longest
            if size >= self._max_batch_size:
                break
        chosen = {id(p) for p in batch}
        self._waiting = [p for p in self._waiting if id(p) not in chosen]
        return batch

    async def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        """One pass on a model thread; always gives its slot back."""
        assert self._slots is not None
        try:
            await self._run_and_deliver(batch)
        finally:
            self._slots.release()

    async def _run_and_deliver(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        size = sum(p.item.size for p in batch)
        if self._observer is not None:
            self._observer.batch(size)
            now = time.perf_counter()
            for pending in batch:
                self._observer.queue_time(now - pending.enqueued)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, [p.item for p in batch]
            )
        except asyncio.CancelledError:
            # stop() during a pass: nobody will deliver its results, so fail it now.
            self._fail(batch, ModelNotReady("the model is shutting down"))
            raise
        except LmserveError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            logger.exception("model forward pass failed")
            self._fail(batch, BackendError(f"model forward pass failed: {exc}"))
            return
        if len(results) != len(batch):
            # zip(strict=True) below would raise and end the batcher for good.
            message = f"the model returned {len(results)} results for {len(batch)} requests"
            self._fail(batch, BackendError(message))
            return
        self.batches_run += 1
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, ItemError):
                pending.future.set_exception(result.error)
            else:
                pending.future.set_result(result)

    @staticmethod
    def _fail(batch: Sequence[_Pending[ItemT, ResultT]], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    def _fail_waiting(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._fail(waiting, exc)
