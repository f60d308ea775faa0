"""A two-node Ray cluster on 127.0.0.1, inside a loopback-only namespace (TESTING.md).

Both "nodes" are ``ray start --block`` processes on this machine: a head and a worker that
joins it, each with its own worker-port range and agent ports (Ray's defaults collide when
two nodes share one host). Each is its own process group, stopped with SIGTERM then SIGKILL
(never ``ray stop``, which ends every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _support.netns import LoopbackNamespace, stop_group
from _support.servers import server_site_env

BIN = Path(sys.executable).parent
HEAD_PORT = 6379
PROBE = Path(__file__).resolve().parent / "ray_probe.py"
# Ray's control store notices a killed node after ~5 missed health checks of 1 s, not 15 s
# (not faster: on a loaded 2-core machine a live node can miss a check or two).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Not the test's `uv run` hook: it would package the repository (caches, models) for workers.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    # Both replicas answer through the one proxy (not only the one on the proxy's node).
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    # Autoscaling decisions in about a second, not tens of seconds (tests are bounded).
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.2",
}


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LMSERVE_"))}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(RAY_ENV)
    env.update(server_site_env())  # the replicas import what a production install has
    env["RAY_ADDRESS"] = f"127.0.0.1:{HEAD_PORT}"
    env.update(extra or {})
    return env


class TwoNodeRay:
    def __init__(self, cpus_per_node: int = 2) -> None:
        self.ns = LoopbackNamespace()
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
        self.cpus = cpus_per_node
        self.logs = self.temp / "node-logs"
        self.logs.mkdir()
        try:
            self.head = self._start("head", ["--head", f"--port={HEAD_PORT}", "--include-dashboard=false",
                                             "--min-worker-port=20000", "--max-worker-port=20999"])  # fmt: skip
            self.wait_nodes(1, 60)
            self.worker = self._start_worker()
            self.wait_nodes(2, 60)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[Any]:
        argv = [str(BIN / "ray"), "start", "--block", f"--temp-dir={self.temp}", f"--num-cpus={self.cpus}",
                "--num-gpus=0", "--object-store-memory=209715200", "--node-ip-address=127.0.0.1", *args]  # fmt: skip
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            return self.ns.popen(argv, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)

    def _start_worker(self) -> subprocess.Popen[Any]:
        return self._start("worker", [f"--address={self.address}", "--min-worker-port=21000",
                                      "--max-worker-port=21999", "--dashboard-agent-listen-port=52466",
                                      "--dashboard-agent-grpc-port=52467", "--metrics-export-port=52468",
                                      "--runtime-env-agent-port=52469", "--node-manager-port=52470",
                                      "--object-manager-port=52471"])  # fmt: skip

    def probe(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run _support/ray_probe.py inside the namespace (a driver of this cluster)."""
        result = self.ns.run([sys.executable, str(PROBE), *args], env=ray_env(), capture_output=True,
                             text=True, timeout=timeout, check=False)  # fmt: skip
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
        assert lines, (
            f"probe {args} printed nothing:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        report: dict[str, Any] = json.loads(lines[-1])
        return report

    def wait_nodes(self, count: int, timeout: float) -> None:
        report = self.probe("wait-nodes", str(count), str(timeout), timeout=timeout + 60)
        if report["alive"] < count:
            raise RuntimeError(
                f"{report['alive']} of {count} Ray nodes came up:\n{self.node_logs()}"
            )

    def kill_worker(self) -> None:
        """The worker machine is lost: SIGKILL, no goodbye to the control store."""
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=10)

    def restart_worker(self) -> None:
        self.worker = self._start_worker()
        self.wait_nodes(2, 60)

    def node_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.logs.glob("*.log"))
        )

    def close(self) -> None:
        for proc in (getattr(self, "worker", None), getattr(self, "head", None)):
            if proc is not None:
                stop_group(proc)
        self.ns.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def wait_for(predicate: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
