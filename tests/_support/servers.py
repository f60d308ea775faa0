"""Start real lmserve server processes for integration tests, on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
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


def start_server(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    wait_ready: bool = True,
) -> ServerProcess:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="lmserve-test-", suffix=".log")[1])
    # vLLM CPU lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes: tests pass the flag.
    inherited = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    full_env = {**inherited, **VLLM_TEST_ENV, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}  # fmt: skip
    # gRPC is on by default (as KServe): each server gets its own free port; args may override.
    cmd = [sys.executable, "-m", "lmserve_server", "--host", "127.0.0.1", "--http_port", str(port),
           "--grpc_port", str(free_port()), "--torch_threads", "1", *args]  # fmt: skip
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
