"""Start real lmserve server processes for integration tests, on 127.0.0.1 only."""

from __future__ import annotations

import atexit
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _support.server_fork import ForkedProcess, ForkServer, forkable


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct free ports, none in `avoid`: every socket stays bound until all are
    picked, so the kernel cannot hand the same port out twice (two separate free_port() calls
    once gave the HTTP and gRPC listeners the same port, and the server exited on "address
    already in use")."""
    held: list[socket.socket] = []
    picked: list[int] = []
    try:
        while len(picked) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                picked.append(port)
        return picked
    finally:
        for sock in held:
            sock.close()


def server_ports(args: Sequence[str]) -> tuple[int, int]:
    """Free (HTTP, gRPC) ports for a server, neither one a port its ``args`` already name
    (a test's own --grpc_port, say)."""
    http, grpc = free_ports(2, avoid={int(a) for a in args if a.isdigit()})
    return http, grpc


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes] | ForkedProcess
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# vLLM on CPU: with V1 multiprocessing off, a one-process model runs its worker inside the engine
# core process (the "uni" executor) instead of a third process. Each vLLM start then imports
# torch and vLLM twice, not three times: ~45 s instead of ~65 s here. Tensor parallel still
# uses the "mp" executor; tests/test_wheels_e2e.py serves with vLLM's defaults.
VLLM_TEST_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# Server processes start with server_site/sitecustomize.py, which hides the test-only packages
# (scikit-learn, SciPy) that transformers would otherwise import at each model load.
SERVER_SITE = Path(__file__).resolve().parent / "server_site"


def server_site_env() -> dict[str, str]:
    """``PYTHONPATH`` for a server process: ``SERVER_SITE`` first, then any inherited path."""
    path = [str(SERVER_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's server process (lmserve's or vLLM's reference): this one's,
    with vLLM's engine in-process, the test-only packages hidden, no hub, one OpenMP thread,
    then ``extra``. vLLM CPU lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes:
    tests pass the flag, so the variable is dropped."""
    inherited = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    return {**inherited, **VLLM_TEST_ENV, **server_site_env(), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **(extra or {})}  # fmt: skip


# Hugging Face servers are forked from one process with torch and transformers imported
# (server_fork.py): ~1-3 s to ready instead of 12-25 s. LMSERVE_TEST_FORK=0 spawns every one.
FORK_SERVERS = os.environ.get("LMSERVE_TEST_FORK", "1") != "0"


@functools.cache
def _fork_server() -> ForkServer:
    server = ForkServer(server_env())
    atexit.register(server.close)
    return server


def start_server(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    wait_ready: bool = True,
) -> ServerProcess:
    port, grpc_port = server_ports(args)
    log = Path(tempfile.mkstemp(prefix="lmserve-test-", suffix=".log")[1])
    full_env = server_env(env)
    # gRPC is on by default (as KServe): each server gets its own free port; args may override.
    cmd = [sys.executable, "-m", "lmserve_server", "--host", "127.0.0.1", "--http_port", str(port),
           "--grpc_port", str(grpc_port), "--torch_threads", "1", *args]  # fmt: skip
    proc: subprocess.Popen[bytes] | ForkedProcess
    if FORK_SERVERS and forkable(args, env):
        proc = _fork_server().start(cmd[3:], full_env, log)
    else:
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, args)
    if wait_ready:
        wait_until_ready(server, timeout)
    return server


def wait_until_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"server not ready in {timeout} s:\n{server.log()}")
