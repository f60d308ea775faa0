"""The forward channel of ``--api_workers``: API workers send padded batches to the process
that holds the model and get its float output back, over a ZeroMQ IPC socket.

Messages are ZeroMQ multipart frames: a one-frame kind, a JSON header, then one raw buffer per
array (C order, the dtype and shape in the header). No pickle: the owner reads only numbers
from a worker, and a malformed message is a ``BackendError``, never code run.

    worker -> owner   [b"F", {"tensors": [{"name", "dtype", "shape"}, ...]}, buf, ...]  forward
                      [b"S"]                                                           status
    owner -> worker   [b"OK", {"dtype", "shape"}, buf]                                 output
                      [b"ST", {"state", "error", "details", "pid"}]                    status
                      [b"ER", {"error": class name, "message", "param"}]              an error

Workers are REQ sockets (one per thread: ZeroMQ sockets are not thread-safe), the owner one
ROUTER on its event loop; the model runs one pass at a time on the owner's forward thread, and
batches that wait meanwhile share the next pass (``batch_merge``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from lmserve_core import errors
from lmserve_core.backend import LoadedEncoder
from lmserve_core.errors import BackendError, LmserveError, ModelNotReady
from lmserve_core.model_host import ModelHost
from lmserve_server import batch_merge

__all__ = [
    "ForwardServer",
    "RemoteEncoder",
    "decode_arrays",
    "decode_reply",
    "encode_arrays",
    "encode_error",
    "encode_output",
    "forward_endpoint",
]

logger = logging.getLogger(__name__)

FORWARD = b"F"
STATUS = b"S"
OUTPUT = b"OK"
STATE = b"ST"
ERROR = b"ER"
# What a worker may send (token ids, masks) and what the model returns (float32 logits or
# hidden states; half precision where a backend keeps it).
INPUT_DTYPES = frozenset({"int64", "int32"})
OUTPUT_DTYPES = frozenset({"float32", "float16", "float64"})
# A forward pass of the largest batch takes well under this on a CPU; past it the owner is
# taken to be stuck and the batch fails with a 500 its clients can read.
FORWARD_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 5.0
HEALTH_INTERVAL_S = 0.5
POLL_SLICE_MS = 100
# Errors that cross the channel by class name (anything else arrives as a BackendError).
_ERRORS: dict[str, type[LmserveError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, LmserveError)
}

Frames = Sequence[bytes | memoryview]


def forward_endpoint(workdir: Path) -> str:
    """The owner's socket in the server's private directory."""
    return f"ipc://{workdir / 'forward'}"


# --- wire format -----------------------------------------------------------------------


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """A JSON header naming each array's dtype and shape, then each array's raw bytes."""
    header, buffers = [], []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        header.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        buffers.append(_bytes_of(array))
    return [json.dumps({"tensors": header}).encode(), *buffers]


def decode_arrays(
    frames: Frames, *, dtypes: frozenset[str] = INPUT_DTYPES
) -> dict[str, np.ndarray]:
    """``encode_arrays``' frames back to writable arrays; BackendError for anything malformed
    (a dtype outside ``dtypes``, a size that does not match the shape, a name twice)."""
    if not frames:
        raise BackendError("forward channel: a message without a header")
    header = _header(frames[0])
    specs = header.get("tensors")
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise BackendError(
            f"forward channel: the header describes {len(specs) if isinstance(specs, list) else 0}"
            f" arrays, the message carries {len(frames) - 1}"
        )
    out: dict[str, np.ndarray] = {}
    for spec, buffer in zip(specs, frames[1:], strict=True):
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name in out:
            raise BackendError(f"forward channel: a missing or repeated array name {name!r}")
        out[name] = _array(spec, buffer, dtypes)
    return out


def encode_output(array: np.ndarray) -> list[bytes | memoryview]:
    array = np.ascontiguousarray(array)
    header = {"dtype": array.dtype.name, "shape": list(array.shape)}
    return [OUTPUT, json.dumps(header).encode(), _bytes_of(array)]


def encode_error(exc: BaseException) -> list[bytes]:
    """An ``LmserveError`` keeps its class (a worker answers as the owner would have); anything
    else is a ``BackendError`` with its type and message."""
    if isinstance(exc, LmserveError):
        body = {"error": type(exc).__name__, "message": exc.message, "param": exc.param}
    else:
        body = {"error": "BackendError", "message": f"{type(exc).__name__}: {exc}", "param": None}
    return [ERROR, json.dumps(body).encode()]


def encode_status(
    state: str, *, error: str | None = None, details: Mapping[str, Any] | None = None
) -> list[bytes]:
    body = {"state": state, "error": error, "details": dict(details or {}), "pid": os.getpid()}
    return [STATE, json.dumps(body, default=str).encode()]


def decode_reply(frames: Frames) -> np.ndarray | dict[str, Any]:
    """The owner's reply: the output array, or a status object; its error raised."""
    if not frames:
        raise BackendError("forward channel: an empty reply")
    kind = bytes(frames[0])
    if kind == OUTPUT and len(frames) == 3:
        output: np.ndarray = _array(_header(frames[1]), frames[2], OUTPUT_DTYPES)
        return output
    if kind == STATE and len(frames) == 2:
        return _header(frames[1])
    if kind == ERROR and len(frames) == 2:
        body = _header(frames[1])
        cls = _ERRORS.get(str(body.get("error")), BackendError)
        param = body.get("param")
        if cls is errors.Overloaded:  # no param; a retry hint instead
            raise errors.Overloaded(str(body.get("message")))
        raise cls(str(body.get("message")), param=param if isinstance(param, str) else None)
    raise BackendError(f"forward channel: an unknown reply {kind[:8]!r} of {len(frames)} frames")


def _bytes_of(array: np.ndarray) -> memoryview:
    """A C-contiguous array's memory as bytes, without a copy."""
    return memoryview(array.data).cast("B")


def _header(frame: bytes | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(frame))
    except ValueError as exc:
        raise BackendError(f"forward channel: a header that is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BackendError("forward channel: a header that is not a JSON object")
    return header


def _array(spec: Mapping[str, Any], buffer: bytes | memoryview, dtypes: frozenset[str]) -> Any:
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in dtypes:
        raise BackendError(f"forward channel: dtype {dtype!r} is not one of {sorted(dtypes)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise BackendError(f"forward channel: shape {shape!r} is not a list of sizes")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(memoryview(buffer).cast("B")) != expected:
        raise BackendError(
            f"forward channel: {len(memoryview(buffer).cast('B'))} bytes for a {dtype} array "
            f"of shape {shape} ({expected} bytes)"
        )
    # A copy: the frame's memory is read-only, and torch warns on read-only arrays.
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


# --- the owner's side ------------------------------------------------------------------


class ForwardServer:
    """Answers the workers on the owner's event loop: forward passes on ``host``'s loaded
    encoder, and the model's state for readiness.

    The model runs one pass at a time on its own thread (the in-process backends' rule);
    batches that arrive meanwhile go through together in the next pass (``batch_merge``)."""

    def __init__(self, host: ModelHost, endpoint: str) -> None:
        self.host = host
        self.endpoint = endpoint
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmserve-forward")
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._waiting: list[tuple[dict[str, np.ndarray], asyncio.Future[np.ndarray]]] = []
        self._arrived = asyncio.Event()
        self.details: dict[str, Any] = {}

    def start(self) -> None:
        self._socket.bind(self.endpoint)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve()), loop.create_task(self._run_model())]

    async def _serve(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            handler = asyncio.ensure_future(self._answer([f.buffer for f in frames]))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

    async def _answer(self, frames: list[memoryview]) -> None:
        # ROUTER framing: [worker identity, empty delimiter (REQ), kind, ...]
        identity, body = bytes(frames[0]), frames[2:]
        try:
            reply = await self._reply(body)
        except Exception as exc:  # the worker gets it; the owner keeps serving
            if not isinstance(exc, LmserveError):
                logger.exception("forward pass failed")
            reply = encode_error(exc)
        await self._socket.send_multipart([identity, b"", *reply], copy=False)

    async def _reply(self, body: Sequence[memoryview]) -> list[Any]:
        kind = bytes(body[0]) if body else b""
        if kind == STATUS:
            return self.status()
        if kind != FORWARD:
            raise BackendError(f"forward channel: an unknown request {kind[:8]!r}")
        loaded = self.host.loaded
        if not isinstance(loaded, LoadedEncoder):
            raise ModelNotReady(f"model {self.host.name!r} is not loaded")
        inputs = decode_arrays(body[1:])
        if "input_ids" not in inputs:
            raise BackendError("forward channel: a batch without input_ids")
        done: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((inputs, done))
        self._arrived.set()
        return encode_output(await done)

    async def _run_model(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._waiting:
                batches, futures = self._next_group()
                try:
                    output = await loop.run_in_executor(self._executor, self._forward, batches)
                    parts = batch_merge.split(output, batches)
                except Exception as exc:  # every batch of the pass gets the error
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for future, part in zip(futures, parts, strict=True):
                    if not future.done():
                        future.set_result(part)

    def _next_group(self) -> tuple[list[dict[str, np.ndarray]], list[asyncio.Future[np.ndarray]]]:
        """The oldest waiting batch and those that merge with it (in arrival order)."""
        batches: list[dict[str, np.ndarray]] = []
        futures: list[asyncio.Future[np.ndarray]] = []
        rest = []
        for inputs, future in self._waiting:
            if not batches or batch_merge.mergeable(batches, inputs):
                batches.append(inputs)
                futures.append(future)
            else:
                rest.append((inputs, future))
        self._waiting = rest
        return batches, futures

    def _forward(self, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        loaded = self.host.loaded
        if not isinstance(loaded, LoadedEncoder):
            raise ModelNotReady(f"model {self.host.name!r} is not loaded")
        merged = batch_merge.merge(batches, pad_id=loaded.tokenizer.pad_token_id)
        return np.asarray(loaded.backend.forward(merged))

    def status(self) -> list[bytes]:
        host = self.host
        details = dict(host.loaded.details) if host.loaded is not None else {}
        state = "ready" if host.ready else host.state.value
        return encode_status(state, error=host.error, details={**details, **self.details})

    async def close(self) -> None:
        for task in [*self._tasks, *self._handlers]:
            task.cancel()
        self._socket.close(linger=0)
        self._context.term()
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- the worker's side -----------------------------------------------------------------


class RemoteEncoder:
    """lmserve_core's ``EncoderBackend`` whose model runs in the owner process."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._closed = threading.Event()
        self._busy = 0  # calls in progress
        self.details: dict[str, Any] = {}

    def _socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] | None = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _drop_socket(self) -> None:
        """After a timeout a REQ socket still waits for its reply: start a fresh one."""
        sock = getattr(self._local, "socket", None)
        if sock is not None:
            self._local.socket = None
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)
            sock.close(linger=0)

    def call(self, frames: Frames, timeout: float) -> np.ndarray | dict[str, Any]:
        with self._lock:
            if self._closed.is_set():
                raise ModelNotReady("the server is shutting down")
            self._busy += 1
        try:
            sock = self._socket()
            sock.send_multipart(frames, copy=False)
            # In slices, so that close() never pulls a socket from under a waiting thread
            # (libzmq aborts the process when that happens).
            deadline = time.monotonic() + timeout
            while not sock.poll(POLL_SLICE_MS, zmq.POLLIN):
                if self._closed.is_set():
                    self._drop_socket()
                    raise ModelNotReady("the server is shutting down")
                if time.monotonic() > deadline:
                    self._drop_socket()
                    raise BackendError(f"the model process did not answer in {timeout:.0f} s")
            return decode_reply(sock.recv_multipart())
        finally:
            with self._lock:
                self._busy -= 1

    # --- EncoderBackend ----------------------------------------------------------------
    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        reply = self.call([FORWARD, *encode_arrays(inputs)], FORWARD_TIMEOUT_S)
        if not isinstance(reply, np.ndarray):
            raise BackendError("forward channel: a status where an output was expected")
        return reply

    def check_health(self) -> None:
        if self._problem is not None:
            raise ModelNotReady(self._problem)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # Calls in progress notice within a poll slice and drop their own sockets.
        deadline = time.monotonic() + 1.0
        while self._busy and time.monotonic() < deadline:
            time.sleep(POLL_SLICE_MS / 1000)
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close(linger=0)
        self._context.destroy(linger=0)

    # --- the owner's state -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        reply = self.call([STATUS], STATUS_TIMEOUT_S)
        if not isinstance(reply, dict):
            raise BackendError("forward channel: an output where a status was expected")
        return reply

    def wait_until_loaded(self) -> dict[str, Any]:
        """Block until the owner's model is ready (its status), or raise why it never will be;
        then keep readiness following the owner (a daemon thread asks every 0.5 s)."""
        while not self._closed.is_set():
            try:
                status = self.status()
            except BackendError:  # the owner is busy starting: ask again
                continue
            if status.get("state") == "ready":
                self.details = dict(status.get("details") or {})
                self._start_probing()
                return status
            if status.get("state") == "failed":
                raise ModelNotReady(f"the model failed to load: {status.get('error')}")
            self._closed.wait(HEALTH_INTERVAL_S)
        raise ModelNotReady("the server is shutting down")

    def _start_probing(self) -> None:
        def run() -> None:
            while not self._closed.wait(HEALTH_INTERVAL_S):
                try:
                    status = self.status()
                except LmserveError as exc:
                    self._problem = f"the model process does not answer: {exc.message}"
                    continue
                except zmq.ZMQError:  # closed under this thread: the worker is stopping
                    return
                ready = status.get("state") == "ready"
                self._problem = None if ready else f"the model is {status.get('state')}"

        threading.Thread(target=run, name="lmserve-owner-health", daemon=True).start()
