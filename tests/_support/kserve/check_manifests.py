"""Check Kubernetes YAML against KServe's own API models (run in the kserve SDK's venv).

The ``kserve`` SDK's model classes (``V1beta1InferenceService``, ``V1alpha1ServingRuntime``,
...) and the ``kubernetes`` client's (``V1Container``, ...) are generated from the same
OpenAPI definitions as KServe's CRDs: every key of a manifest must be a field of the type at
its place, every value of that field's type, and every required field present (the models'
client-side validation in their setters). Prints one JSON report: {"checked": [...], "errors": [...]}.

Two types that the SDK's models name are missing from kserve==0.21.0, so they are supplied here
from their definitions rather than left unchecked:

- ``V1alpha1WorkerSpec`` (``ServingRuntimeSpec.workerSpec``, multi-node): KServe's Go type is
  ``WorkerSpec{ServingRuntimePodSpec (inline); PipelineParallelSize *int; TensorParallelSize
  *int}`` (pkg/apis/serving/v1alpha1/servingruntime_types.go), i.e. the fields of
  ``V1alpha1ServingRuntimePodSpec`` plus two ints, checked as such.
- ``K8sIoApiAppsV1DeploymentStrategy`` (``PredictorSpec.deploymentStrategy``) is Kubernetes'
  apps/v1 DeploymentStrategy, which the ``kubernetes`` client calls ``V1DeploymentStrategy``.

    python check_manifests.py FILE.yaml [...]
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kserve.models
import kubernetes.client.models
import yaml

KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _v1alpha1_worker_spec() -> type:
    pod = kserve.models.V1alpha1ServingRuntimePodSpec
    sizes = {"pipeline_parallel_size": "pipelineParallelSize",
             "tensor_parallel_size": "tensorParallelSize"}  # fmt: skip

    class V1alpha1WorkerSpec:
        openapi_types = {**pod.openapi_types, **dict.fromkeys(sizes, "int")}
        attribute_map = {**pod.attribute_map, **sizes}

        def __init__(self, **fields: Any) -> None:
            pod(**{k: v for k, v in fields.items() if k not in sizes})  # required: containers

    return V1alpha1WorkerSpec


MISSING_FROM_SDK = {
    "V1alpha1WorkerSpec": _v1alpha1_worker_spec,
    "K8sIoApiAppsV1DeploymentStrategy": lambda: kubernetes.client.models.V1DeploymentStrategy,
}


def model_class(name: str) -> Any:
    found = getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)
    if found is None and name in MISSING_FROM_SDK:
        return MISSING_FROM_SDK[name]()
    return found


def check(value: Any, type_name: str, where: str, errors: list[str]) -> None:
    if type_name == "object":
        return
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]) or (
            type_name != "bool" and isinstance(value, bool)
        ):
            errors.append(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            check(item, match[1], f"{where}[{i}]", errors)
        return
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping")
            return
        for key, item in value.items():
            check(item, match[1] or match[2], f"{where}.{key}", errors)
        return
    cls = model_class(type_name)
    if cls is None:
        errors.append(f"{where}: unknown type {type_name}")
        return
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a {type_name} mapping, got {value!r}")
        return
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    given = {}
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{where}.{key}: not a field of {type_name}")
            continue
        given[attr] = item
        check(item, cls.openapi_types[attr], f"{where}.{key}", errors)
    try:  # the generated setters refuse a missing required field or a value not allowed
        cls(**given)
    except ValueError as exc:
        errors.append(f"{where}: {type_name}: {exc}")


def check_document(doc: dict[str, Any], where: str, errors: list[str]) -> str:
    kind = KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    if kind is None:
        errors.append(
            f"{where}: unsupported apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}"
        )
        return "?"
    check(doc, kind, where, errors)
    return kind


def main(paths: list[str]) -> int:
    checked, errors = [], []
    for path in paths:
        with open(path) as fh:
            for i, doc in enumerate(yaml.safe_load_all(fh)):
                if doc:
                    checked.append(
                        {"file": path, "kind": check_document(doc, f"{path}#{i}", errors)}
                    )
    print(json.dumps({"checked": checked, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
