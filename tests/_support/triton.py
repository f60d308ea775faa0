"""A real Triton Inference Server on the CPU, on 127.0.0.1 only, for integration tests.

``nvidia-pytriton==0.7.0`` bundles a real ``tritonserver`` 2.51 binary with its python backend
(and python stubs for Python 3.8-3.13) but no ONNX Runtime backend. The python-based backend
in ``triton_onnx_backend/model.py``, installed as ``<backend-directory>/onnxruntime/model.py``,
serves ``platform: "onnxruntime_onnx"`` models, so Triton runs a model repository written by
``lmserve export`` unmodified.

- ``ensure_triton_env()`` builds, once, a separate virtual environment with pytriton and
  onnxruntime (pytriton pins ``numpy<2``, the project uses numpy 2): ``_support/side_venvs.py``,
  cached in ``<repo>/.cache/triton-venv-<hash>``.
- ``start_triton(repo)`` copies (never symlinks) a backend directory into a private temporary
  directory::

      backends/python/libtriton_python.so             from pytriton/tritonserver/backends/python
      backends/python/triton_python_backend_utils.py  from pytriton/tritonserver/backends/python
      backends/python/triton_python_backend_stub      pytriton/tritonserver/python_backend_stubs/3.X
      backends/onnxruntime/model.py                   tests/_support/triton_onnx_backend

  and starts ``tritonserver`` on free 127.0.0.1 ports with a unique ``--id`` and python-backend
  shm prefix, metrics off. The copied stub loses its ``$ORIGIN`` RPATH to pytriton's bundled
  ``libcudart``, and the stub must load the base interpreter's ``libpython`` (not a system one
  of another patch release), so ``LD_LIBRARY_PATH`` starts with the base interpreter's library
  directory, then ``nvidia_pytriton.libs``. ``PATH`` starts with the venv's ``bin``: the stub's
  embedded interpreter finds its ``sys.prefix`` (and so onnxruntime) through ``python3`` there.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from _support.servers import free_ports
from _support.side_venvs import clean_env, ensure_side_venv, run_checked

BACKEND_SOURCE = Path(__file__).resolve().parent / "triton_onnx_backend"
PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime")
MIN_GLIBC = (2, 35)  # what the nvidia-pytriton 0.7.0 wheels are built for
STOP_TIMEOUT = 10.0
# Python backend shared memory per model instance (pytriton's sizes): plenty for test tensors,
# small on a shared /dev/shm.
SHM_DEFAULT_BYTES = 4 * 1024 * 1024
SHM_GROWTH_BYTES = 1024 * 1024


def _say(message: str) -> None:
    print(f"[triton] {message}", file=sys.stderr, flush=True)


def unavailable_reason() -> str | None:
    """Why the bundled Triton cannot run on this machine, or None when it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return f"nvidia-pytriton has no wheels for {sys.platform}/{platform.machine()}"
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    name, _, version = libc.partition(" ")
    if name != "glibc":
        return f"nvidia-pytriton needs glibc, this machine has {libc or 'an unknown libc'}"
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_GLIBC:
        return f"nvidia-pytriton 0.7.0 needs glibc >= 2.35, this machine has {version}"
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return f"pytriton 0.7.0 has python backend stubs for 3.8-3.13, not {sys.version_info[:2]}"
    return None


# -- the virtual environment -----------------------------------------------------------------


def ensure_triton_env() -> Path:
    """Return the venv with pytriton and onnxruntime, building it on first use (~40 s)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    # The backend is copied at each start, not installed: the hash covers only this file.
    return ensure_side_venv("triton", PACKAGES, hash_files=[Path(__file__)], probe=_probe)


def _probe(venv: Path) -> dict[str, object]:
    probe = run_checked(
        [str(venv / "bin" / "python"), "-c",
         "import json, numpy, onnxruntime, pytriton, importlib.metadata as m; "
         "print(json.dumps({p: m.version(p) for p in "
         "('nvidia-pytriton', 'onnxruntime', 'numpy')}))"],
        "import check",
    )  # fmt: skip
    tritonserver_dist(venv)  # fails here, not at the first start, if the layout changed
    return dict(json.loads(probe.stdout.strip().splitlines()[-1]))


def tritonserver_dist(venv: Path) -> Path:
    """pytriton's ``tritonserver`` folder (``bin/tritonserver``, ``backends/python`` ...)."""
    found = sorted(venv.glob("lib/python*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    if len(found) != 1:
        raise RuntimeError(f"expected one pytriton tritonserver binary under {venv}, found {found}")
    return found[0].parent.parent


# -- the server ------------------------------------------------------------------------------


@dataclass
class TritonServer:
    http_url: str  # http://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT (what tritonclient.grpc takes)
    proc: subprocess.Popen[bytes]
    log_path: Path
    server_id: str
    work_dir: Path  # the private backend directory lives here; removed by stop()
    startup_seconds: float = 0.0
    cmd: list[str] = field(default_factory=list)

    @property
    def http_host(self) -> str:
        """host:port, what tritonclient.http takes."""
        return self.http_url.removeprefix("http://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT (Triton unloads its models and exits), SIGKILL to its group after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _say(f"tritonserver {self.proc.pid} ignored SIGINT for {STOP_TIMEOUT:g} s: SIGKILL")
                # Its group: Triton and its python stubs (own session, see _launch). The
                # leader is not reaped yet, so the group id cannot belong to anyone else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL Triton and its python stubs at once: a predictor that dies, not one that
        shuts down."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_triton(
    model_repository: Path, *, timeout: float = 120, extra_args: list[str] | None = None
) -> TritonServer:
    """Start ``tritonserver`` on ``model_repository`` and wait until it and its models are ready."""
    venv = ensure_triton_env()
    for attempt in range(3):
        server = _launch(venv, Path(model_repository), list(extra_args or []))
        try:
            _wait_ready(server, timeout)
            return server
        except _PortTaken:
            server.stop()
            _say(f"a port was taken before Triton bound it (attempt {attempt + 1}); retrying")
        except BaseException:
            server.stop()
            raise
    raise RuntimeError("tritonserver could not bind free ports three times in a row")


def serve_exported(
    repository: Path, models: dict[str, tuple[Path, str]], inputs: list[str]
) -> TritonServer:
    """``lmserve export`` each ``name: (model folder, task)`` into ``repository``, then start
    Triton on it; the calling test is skipped where Triton cannot run."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from lmserve_backend_hf.export import export_onnx

    for name, (model_dir, task) in models.items():
        export_onnx(model_dir, task, inputs, repository, model_name=name)
    return start_triton(repository)


class _PortTaken(RuntimeError):
    pass


def _backend_directory(dist: Path, target: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    python_dir = target / "python"
    python_dir.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, python_dir / name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    shutil.copytree(
        BACKEND_SOURCE, target / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__")
    )
    return target


def _library_path(dist: Path) -> str:
    parts = []
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        parts.append(libdir)  # the stub must load this libpython, not /usr/lib's
    parts.append(str(dist.parent.parent / "nvidia_pytriton.libs"))  # libcudart for the stub
    if os.environ.get("LD_LIBRARY_PATH"):
        parts.append(os.environ["LD_LIBRARY_PATH"])
    return ":".join(parts)


def _launch(venv: Path, repository: Path, extra_args: list[str]) -> TritonServer:
    dist = tritonserver_dist(venv)
    work = Path(tempfile.mkdtemp(prefix="lmserve-triton-"))
    backends = _backend_directory(dist, work / "backends")
    token = secrets.token_hex(4)
    server_id = f"lmserve-test-{token}"
    shm_prefix = f"lmserve-test-{os.getpid()}-{token}-"
    http_port, grpc_port = free_ports(2)
    log = Path(tempfile.mkstemp(prefix="lmserve-triton-", suffix=".log")[1])
    cmd = [
        str(dist / "bin" / "tritonserver"),
        "--model-repository", str(repository.resolve()),
        "--backend-directory", str(backends),
        "--id", server_id,
        "--http-address", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
        "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
        "--allow-sagemaker=false", "--allow-vertex-ai=false",
        "--pinned-memory-pool-byte-size=0",  # no CUDA here: skip the pinned-memory attempt
        "--exit-timeout-secs=5",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
        *extra_args,
    ]  # fmt: skip
    env = clean_env()
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["LD_LIBRARY_PATH"] = _library_path(dist)
    env.setdefault("OMP_NUM_THREADS", "1")
    _say(f"starting tritonserver {server_id} on http {http_port}, grpc {grpc_port} ({log})")
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return TritonServer(
        http_url=f"http://127.0.0.1:{http_port}",
        grpc_url=f"127.0.0.1:{grpc_port}",
        proc=proc,
        log_path=log,
        server_id=server_id,
        work_dir=work,
        cmd=cmd,
    )


def _wait_ready(server: TritonServer, timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(base_url=server.http_url, timeout=2) as client:
        while True:
            if server.proc.poll() is not None:
                log = server.log()
                if "already in use" in log or "Address in use" in log:
                    raise _PortTaken(log[-2000:])
                raise RuntimeError(
                    f"tritonserver exited with {server.proc.returncode}:\n{log[-6000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"tritonserver not ready after {timeout:g} s:\n{server.log()[-6000:]}"
                )
            try:
                if client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        # Make sure it is *our* server answering on that port.
        metadata = client.get("/v2").json()
    if metadata.get("name") != server.server_id:
        raise RuntimeError(f"GET {server.http_url}/v2 answered {metadata}, not {server.server_id}")
    server.startup_seconds = time.monotonic() - started
    _say(f"tritonserver {metadata.get('version')} ready in {server.startup_seconds:.1f} s")
