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


PACKAGES = [
    "lmserve_protocols",
    "lmserve_core",
    "lmserve_backend_hf",
    "lmserve_backend_vllm",
    "lmserve_server",
]


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(edges[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_import_cycles_are_found() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_has_an_import_cycle(package: str) -> None:
    """Imports inside functions count too: a module pair that needs a lazy import to load is
    still a cycle in the design (only TYPE_CHECKING imports are left out)."""
    import grimp

    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    edges = {
        module: set(graph.find_modules_directly_imported_by(module)) & graph.modules - {module}
        for module in graph.modules
    }
    assert import_cycles(edges) == []
