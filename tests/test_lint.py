"""ruff (lint, format, banned module-level heavy imports) and mypy strict, as tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff_check() -> None:
    r = run(str(BIN / "ruff"), "check", "packages", "tests", "scripts")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = run(str(BIN / "ruff"), "format", "--check", "packages", "tests", "scripts")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_on_protocols_core_server() -> None:
    r = run(str(BIN / "mypy"))
    assert r.returncode == 0, r.stdout + r.stderr
