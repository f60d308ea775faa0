"""Test servers forked from a process that has already imported torch and transformers.

An lmserve server on the Hugging Face backend spends most of its start-up importing torch,
transformers and the model classes (12-25 s on the 2-core test box, against ~1 s to load a
tiny model), and the suite starts about a hundred of them. ``ForkServer`` keeps one process
(the "zygote") with those imports done, and starts each such server as a ``fork()`` of it that
runs ``lmserve_server``'s real command line (``serve_main``) with the server's own arguments,
environment, working directory and log file, as ``python -m lmserve_server`` would.

Only servers whose start-up imports nothing that reads its environment at import time, and
that do not look at their own command line, are forked (``forkable``): the Hugging Face
backend with at most ``LMSERVE_*`` variables added. vLLM, ONNX, the Triton bridge,
``--api_workers`` and any other environment are started as fresh processes, and the tests of
the command line itself (exit codes and messages in ``test_startup_e2e`` and
``test_vllm_flags``, the wheel and example tests) run the real command.

The zygote stays single-threaded (``fork()`` copies only the calling thread), runs no torch
operation (OpenMP's thread pool does not survive a fork) and imports with the same
environment every forked server gets (``server_env``): ``OMP_NUM_THREADS``, ``HF_HUB_OFFLINE``
and the ``server_site`` path are read at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import infer_model_task
from lmserve_core.plan import choose_backend
from lmserve_core.settings import Backend
from lmserve_core.tasks import parse_task

# Where a forked server's command line would differ from a spawned one's.
_SPAWN_ONLY_FLAGS = ("--predictor_host", "--predictor-host", "--api_workers", "--api-workers")


def forkable(args: Sequence[str], env: Mapping[str, str] | None) -> bool:
    """Whether a server with ``args`` (and ``env`` added) runs the same forked as spawned: it is
    served by Hugging Face, by ``--backend huggingface`` or by lmserve's own default for its
    model's task (``plan.choose_backend``: vLLM for generation where installed)."""
    if any(not key.startswith("LMSERVE_") or key == "LMSERVE_EVENT_LOOP" for key in env or {}):
        return False
    if any(a.split("=")[0] in _SPAWN_ONLY_FLAGS for a in args):
        return False
    requested = _flag(args, "--backend") or "auto"
    if requested == "huggingface":
        return True
    model_dir = _flag(args, "--model_dir") or _flag(args, "--model-dir")
    if requested != "auto" or model_dir is None:
        return False
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        named = _flag(args, "--task")
        task = parse_task(named) if named else infer_model_task(Path(model_dir), config)
        backend, _, _ = choose_backend(Backend.auto, task)
    except (OSError, ValueError, ConfigurationError):
        return False  # the server's own start reports it
    return backend == "huggingface"


def _flag(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a server the zygote forked (it is the
    zygote's child, not ours: the zygote reaps it and writes its exit status to a file)."""

    def __init__(self, pid: int, status_path: Path) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._status_path = status_path

    def poll(self) -> int | None:
        if self.returncode is None and self._status_path.exists():
            text = self._status_path.read_text()
            if text.strip():
                self.returncode = int(text)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked server {self.pid}", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The zygote: started on first use, stopped with ``close()`` (and with this process)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._dir = Path(tempfile.mkdtemp(prefix="lmserve-fork-"))
        self._socket = self._dir / "zygote.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(
        self, argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: str | None = None
    ) -> ForkedProcess:
        with self._lock:
            self._ensure_running()
        status = Path(tempfile.mkstemp(prefix="status-", dir=self._dir)[1])
        request = {"argv": list(argv), "env": dict(env), "log": str(log),
                   "cwd": cwd or os.getcwd(), "status": str(status)}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(self._socket))
            conn.sendall(json.dumps(request).encode())
            conn.shutdown(socket.SHUT_WR)
            reply = json.loads(_read_all(conn))
        return ForkedProcess(int(reply["pid"]), status)

    def _ensure_running(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-P", __file__, str(self._socket)],
            env=self._env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # "ready" once the imports are done
        if line.strip() != b"ready":
            raise RuntimeError(f"the fork server did not start (exit {self._proc.wait()})")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            for path in self._dir.iterdir():
                path.unlink()
            self._dir.rmdir()


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- the zygote ----------------------------------------------------------------------------


def _die_with_parent(sig: int) -> None:
    """Linux: ``sig`` to a forked server when the zygote (single-threaded) exits, so nothing
    outlives an aborted test run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG


def _preload() -> None:
    """What Hugging Face servers import before they can answer: torch, transformers, the tiny
    test models' classes, lmserve's server and Hugging Face backend."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.t5.modeling_t5",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "lmserve_backend_hf.encoder",
    "lmserve_backend_hf.engine",
    "lmserve_backend_hf.gen_loader",
    "lmserve_backend_hf.loader",
    "lmserve_backend_hf.tokenizer",
    "lmserve_server.app",
    "lmserve_server.cli",
    "lmserve_server.grpc_service",
    "lmserve_server.runner",
)


def _run_child(request: dict[str, object], keep_open: Sequence[socket.socket]) -> None:
    """In the forked child: become the server. Never returns (SystemExit ends the process
    through the interpreter's normal shutdown, atexit and thread joins included)."""
    for sock in keep_open:
        sock.close()
    _die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(str(request["cwd"]))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})  # type: ignore[call-overload]
    log = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
    sys.argv = ["-m", *argv]
    from lmserve_server.cli import serve_main

    serve_main(argv, prog="python -m lmserve_server")
    raise SystemExit(0)


def _zygote(socket_path: str) -> None:
    # Not PR_SET_PDEATHSIG here: it fires when the *thread* that started us ends, and a test may
    # start the first server from a worker thread. A changed parent pid means pytest is gone.
    parent = os.getppid()
    _preload()
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("the fork server has threads after its imports: forking is unsafe")
    with contextlib.suppress(FileNotFoundError):  # a zygote before this one died
        os.unlink(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    statuses: dict[int, str] = {}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while os.getppid() == parent:
        _reap(statuses)
        readable, _, _ = select.select([listener], [], [], 0.05)
        if not readable:
            continue
        conn, _ = listener.accept()
        with conn:
            request = json.loads(_read_all(conn))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(request, [listener, conn])
            statuses[pid] = str(request["status"])
            conn.sendall(json.dumps({"pid": pid}).encode())


def _reap(statuses: dict[int, str]) -> None:
    while statuses:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = statuses.pop(pid, None)
        if path is not None:
            partial = Path(path + ".part")  # renamed into place: never read half-written
            partial.write_text(str(os.waitstatus_to_exitcode(status)))
            partial.rename(path)


if __name__ == "__main__":
    _zygote(sys.argv[1])
