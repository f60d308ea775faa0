"""Separate virtual environments for test tools whose pins clash with the project's (pytriton
wants numpy<2; the kserve SDK pins its own web stack), built once from the *base* interpreter
of the project's venv and cached in ``<repo>/.cache/<name>-venv-<hash>``.

The hash covers the packages, the given source files and the base interpreter. Virtual
environments are not relocatable, so each is built in place under an ``fcntl`` lock and a
``.complete`` marker is written last: a directory without it is a crashed build and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmserve_core.builtin_models import cache_lock

CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache"


def say(message: str) -> None:
    print(f"[side-venv] {message}", file=sys.stderr, flush=True)


def base_interpreter() -> Path:
    """The interpreter the project's venv was made from (``sys.executable`` is the venv's)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    bindir = Path(sysconfig.get_config_var("BINDIR") or "/nonexistent")
    candidates = [getattr(sys, "_base_executable", ""), str(bindir / f"python{version}")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and not _inside_venv(Path(candidate)):
            return Path(candidate)
    raise RuntimeError(f"cannot find the base interpreter of {sys.executable} (tried {candidates})")


def _inside_venv(executable: Path) -> bool:
    return (executable.parent.parent / "pyvenv.cfg").is_file()


def clean_env() -> dict[str, str]:
    """The environment minus what points at the project's venv."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "UV_PROJECT_ENVIRONMENT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_checked(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{what} failed with exit code {result.returncode}:\n{tail}")
    return result


def ensure_side_venv(
    name: str,
    packages: Sequence[str],
    *,
    hash_files: Sequence[Path] = (),
    probe: Callable[[Path], dict[str, object]] | None = None,
) -> Path:
    """The venv ``name`` with ``packages`` installed, built on first use. ``probe(venv)``
    checks the build (raising if it is unusable) and returns facts kept in the marker."""
    digest = hashlib.sha256("\n".join(packages).encode())
    for path in hash_files:
        digest.update(path.read_bytes())
    digest.update(str(base_interpreter()).encode())
    venv = CACHE_DIR / f"{name}-venv-{digest.hexdigest()[:12]}"
    marker = venv / ".complete"
    if marker.is_file():
        return venv
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with cache_lock(CACHE_DIR / f".{venv.name}.lock"):
        if marker.is_file():  # another process built it while we waited
            return venv
        if venv.exists():
            say(f"removing an incomplete build at {venv}")
            shutil.rmtree(venv)
        try:
            _build(venv, packages, probe)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
    return venv


def _build(
    venv: Path, packages: Sequence[str], probe: Callable[[Path], dict[str, object]] | None
) -> None:
    started = time.perf_counter()
    base = base_interpreter()
    say(f"building {venv} from {base} (once; cached)")
    run_checked([str(base), "-m", "venv", str(venv)], "python -m venv")
    say(f"pip install {' '.join(packages)} ...")
    run_checked([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", "--progress-bar", "off", *packages], "pip install")  # fmt: skip
    facts = probe(venv) if probe is not None else {}
    seconds = time.perf_counter() - started
    info = {"packages": list(packages), "facts": facts, "base_interpreter": str(base),
            "build_seconds": seconds}  # fmt: skip
    (venv / ".complete").write_text(json.dumps(info, indent=2) + "\n")
    say(f"built {venv.name} in {seconds:.1f} s: {facts}")
