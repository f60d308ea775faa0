"""core and protocols import none of the heavy or web libraries (ARCHITECTURE.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "transformers", "vllm", "fastapi", "starlette", "grpc")

SCRIPT = textwrap.dedent(
    """
    import json, pkgutil, sys, importlib
    import lmserve_core
    import lmserve_protocols
    # Every module of core, not only what the package __init__ pulls in.
    names = [m.name for m in pkgutil.walk_packages(lmserve_core.__path__, "lmserve_core.")]
    for name in names:
        importlib.import_module(name)
    forbidden = %r
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
    print(json.dumps({"modules": names, "loaded": loaded}))
    """
)


def _probe(forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT % (forbidden,)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_core_and_protocols_import_no_heavy_libraries() -> None:
    report = _probe(FORBIDDEN)
    assert report["loaded"] == []
    # The walk really covered the package.
    for name in ("lmserve_core.v2_codec", "lmserve_core.batching", "lmserve_core.encoder.service",
                 "lmserve_core.backend", "lmserve_core.model_files"):  # fmt: skip
        assert name in report["modules"]


def test_the_probe_sees_what_is_imported() -> None:
    # Guard against a vacuous check: the same probe reports modules that do get loaded.
    assert _probe(("numpy", "pydantic"))["loaded"] != []
    assert {m.split(".")[0] for m in _probe(("numpy", "pydantic"))["loaded"]} == {
        "numpy",
        "pydantic",
    }
