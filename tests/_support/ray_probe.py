"""A Ray driver for the tests, run inside the cluster's namespace (``TwoNodeRay.probe``).
It prints one JSON line: what it observed. The assertions stay in the tests.

    ray_probe.py wait-nodes COUNT TIMEOUT     alive nodes, waiting up to TIMEOUT s for COUNT
    ray_probe.py cluster                      lmserve's RayCluster: view, wait_for, watch
    ray_probe.py watch-until-lost TIMEOUT     NodeWatch.check() until it reports a lost node
    ray_probe.py replicas APP                 Ray Serve's running replicas of APP, and their nodes
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _nodes_alive() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def wait_nodes(count: int, timeout: float) -> dict[str, Any]:
    import ray

    ray.init(log_to_driver=False)
    deadline = time.monotonic() + timeout
    while (alive := _nodes_alive()) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"alive": alive}


def cluster() -> dict[str, Any]:
    from lmserve_backend_vllm.ray_cluster import RayCluster
    from lmserve_core.errors import ConfigurationError

    joined = RayCluster.join()
    view = joined.view()
    out: dict[str, Any] = {"address": joined.address, "alive": len(view.alive), "cpus": view.total("CPU"),
                           "describe": view.describe()}  # fmt: skip
    started = time.monotonic()
    joined.wait_for("CPU", view.total("CPU"), timeout=5, needed_by="the test")
    out["wait_met_seconds"] = time.monotonic() - started
    started = time.monotonic()
    try:
        joined.wait_for(
            "GPU", 2, timeout=2, needed_by="--tensor-parallel-size 2 x --pipeline-parallel-size 1"
        )
        out["wait_unmet_error"] = None
    except ConfigurationError as exc:
        out["wait_unmet_error"] = exc.message
    out["wait_unmet_seconds"] = time.monotonic() - started
    watch = joined.watch("CPU")
    watch.check()
    out["watched_nodes"] = len(watch.held)
    return out


def watch_until_lost(timeout: float) -> dict[str, Any]:
    """Started while both nodes are alive; the test kills one after the 'watching' line."""
    from lmserve_backend_vllm.ray_cluster import RayCluster
    from lmserve_core.errors import ModelNotReady

    watch = RayCluster.join().watch("CPU")
    watch.min_interval = 0.2
    watch.check()
    print(json.dumps({"watching": len(watch.held)}), flush=True)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            watch.check()
        except ModelNotReady as exc:
            return {"lost_after_seconds": time.monotonic() - started, "error": exc.message}
        time.sleep(0.2)
    return {"lost_after_seconds": None, "error": None}


def replicas(app: str) -> dict[str, Any]:
    import ray
    from ray import serve

    ray.init(log_to_driver=False)
    status = serve.status().applications[app]
    deployment = status.deployments["lmserve"]
    return {"app_status": str(status.status), "replica_states": {str(k): v for k, v in
            deployment.replica_states.items()}}  # fmt: skip


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "wait-nodes":
        result = wait_nodes(int(args[0]), float(args[1]))
    elif command == "cluster":
        result = cluster()
    elif command == "watch-until-lost":
        result = watch_until_lost(float(args[0]))
    elif command == "replicas":
        result = replicas(args[0])
    else:
        raise SystemExit(f"unknown probe {command}")
    print(json.dumps(result), flush=True)
