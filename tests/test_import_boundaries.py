"""The dependency direction of ARCHITECTURE.md, enforced (import-linter + fresh imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "transformers",
    "vllm",
    "fastapi",
    "starlette",
    "grpc",
    "onnxruntime",
    "tritonclient",
)


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("lmserve_protocols", (*HEAVY, "numpy")),
        ("lmserve_core", HEAVY),
        ("lmserve_core.encoder", HEAVY),
        ("lmserve_core.v2_codec", HEAVY),
        ("lmserve_backend_hf", HEAVY),  # heavy imports wait for the factory
        ("lmserve_backend_vllm", HEAVY),
        (
            "lmserve_server",
            ("torch", "transformers", "vllm", "lmserve_backend_hf", "lmserve_backend_vllm"),
        ),
        (
            "lmserve_server.app",
            ("torch", "transformers", "vllm", "lmserve_backend_hf", "lmserve_backend_vllm"),
        ),
    ],
)
def test_fresh_import_stays_light(package: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, json, {package}; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(r.stdout))
    leaked = sorted(m for m in forbidden if m in loaded)
    assert not leaked, f"import {package} loaded {leaked}"


def test_every_package_is_typed_and_versioned() -> None:
    for pyproject in sorted((ROOT / "packages").glob("*/pyproject.toml")):
        pkg_dir = pyproject.parent
        text = pyproject.read_text()
        assert 'version = "' in text, pyproject
        assert (pkg_dir / "CHANGELOG.md").is_file(), pkg_dir
        (module_dir,) = [p for p in (pkg_dir / "src").iterdir() if p.is_dir()]
        assert (module_dir / "py.typed").is_file(), module_dir
        assert (pkg_dir / "tests").is_dir(), pkg_dir
