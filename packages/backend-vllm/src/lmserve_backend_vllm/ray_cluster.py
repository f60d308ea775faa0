"""vLLM across machines on Ray: join the cluster that is already there, wait for its devices,
and keep watching the nodes the engine was started on.

lmserve never starts Ray itself: ``ray start --head`` / ``ray start --address`` (or KubeRay,
or KServe's multi-node runtime) make the cluster, ``RAY_ADDRESS`` names it, and vLLM places its
workers on it. What lmserve adds is what a serving runtime needs around that: a clear error
when the cluster cannot be joined or cannot run vLLM's workers, a progress line while workers
are still joining, and a readiness that turns 503 when a node the engine runs on is lost.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lmserve_core.errors import ConfigurationError, ModelNotReady

logger = logging.getLogger(__name__)

PARAM = "distributed_executor_backend"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    alive: bool
    resources: dict[str, float]


@dataclass(frozen=True)
class ClusterView:
    """The cluster as Ray's control store (GCS) reports it at one moment."""

    address: str
    nodes: tuple[NodeInfo, ...]

    @property
    def alive(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.nodes if n.alive)

    def total(self, resource: str) -> float:
        return sum(n.resources.get(resource, 0.0) for n in self.alive)

    def describe(self) -> str:
        cpus, gpus = self.total("CPU"), self.total("GPU")
        return f"{len(self.alive)} node(s) alive, {cpus:g} CPU, {gpus:g} GPU"


def nodes_from_ray(raw: Iterable[dict[str, Any]]) -> tuple[NodeInfo, ...]:
    """``ray.nodes()`` entries -> NodeInfo (a dead node keeps its id, loses its resources)."""
    return tuple(
        NodeInfo(
            node_id=str(n.get("NodeID", "")),
            address=str(n.get("NodeManagerAddress", "?")),
            alive=bool(n.get("Alive", False)),
            resources={str(k): float(v) for k, v in (n.get("Resources") or {}).items()},
        )
        for n in raw
    )


class RayCluster:
    """A connection to an existing Ray cluster (this process becomes one of its drivers)."""

    def __init__(self, address: str, list_nodes: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self.address = address
        self._list_nodes = list_nodes

    @classmethod
    def join(cls, address: str | None = None) -> RayCluster:
        """Connect to ``address``, else ``RAY_ADDRESS``, else the cluster started on this machine."""
        # vLLM's workers run the vLLM installed on each node; under ``uv run`` Ray's uv hook
        # would package the current directory and start workers through uv instead.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        try:
            import ray
        except ImportError as exc:
            raise ConfigurationError(
                "--distributed-executor-backend ray needs Ray: install lmserve-backend-vllm[ray]",
                param=PARAM,
            ) from exc

        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace="lmserve", log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=False)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigurationError(
                    f"cannot join the Ray cluster at {address} (RAY_ADDRESS): {exc}; start it "
                    "first with `ray start --head` (and `ray start --address HEAD:PORT` on the "
                    "other machines)",
                    param=PARAM,
                ) from exc
        return cls(address, ray.nodes)

    def view(self) -> ClusterView:
        return ClusterView(self.address, nodes_from_ray(self._list_nodes()))

    def wait_for(
        self, resource: str, amount: float, *, timeout: float, needed_by: str,
        poll: float = 1.0, log_every: float = 10.0,
    ) -> ClusterView:  # fmt: skip
        """Block until the alive nodes together offer ``amount`` of ``resource`` (workers are
        often still joining when the head starts); ConfigurationError after ``timeout`` s."""
        started = time.monotonic()
        last_log: float | None = None
        while True:
            view = self.view()
            have = view.total(resource)
            if have >= amount:
                return view
            now = time.monotonic()
            if now - started >= timeout:
                raise ConfigurationError(
                    f"the Ray cluster at {self.address} offers {have:g} of the {amount:g} "
                    f"{resource} that {needed_by} need ({view.describe()}) after waiting "
                    f"{timeout:g} s (--ray_cluster_timeout)",
                    param=PARAM,
                )
            if last_log is None or now - last_log >= log_every:
                logger.info("waiting for the Ray cluster at %s: %g of %g %s (%s)",
                            self.address, have, amount, resource, view.describe())  # fmt: skip
                last_log = now
            time.sleep(poll)

    def watch(self, resource: str) -> NodeWatch:
        """Watch the nodes that offer ``resource`` now: vLLM's workers are placed on them."""
        view = self.view()
        held = {n.node_id: n.address for n in view.alive if n.resources.get(resource, 0) > 0}
        return NodeWatch(self, held, resource)


@dataclass
class NodeWatch:
    """Readiness of an engine spread over Ray nodes: every node that held the engine's device
    resource when it started must still be alive. Reads the control store at most once every
    ``min_interval`` s, since readiness probes can come often."""

    cluster: RayCluster
    held: dict[str, str]  # node id -> address
    resource: str
    min_interval: float = 2.0
    _checked_at: float = field(default=-1e9, repr=False)
    _error: str | None = field(default=None, repr=False)

    def check(self) -> None:
        now = time.monotonic()
        if now - self._checked_at >= self.min_interval:
            self._checked_at = now
            self._error = self._find_lost()
        if self._error is not None:
            # 503, like readiness: the engine cannot serve until its nodes are back.
            raise ModelNotReady(self._error)

    def _find_lost(self) -> str | None:
        try:
            view = self.cluster.view()
        except Exception as exc:  # the control store itself is gone (head lost)
            return f"the Ray cluster at {self.cluster.address} does not answer: {exc}"
        alive = {n.node_id for n in view.alive}
        lost = [address for node_id, address in self.held.items() if node_id not in alive]
        if not lost:
            return None
        return (
            f"Ray node(s) {', '.join(sorted(lost))} that held the engine's {self.resource} "
            f"left the cluster at {self.cluster.address} ({len(self.held) - len(lost)} of "
            f"{len(self.held)} still alive)"
        )

    def summary(self) -> dict[str, Any]:
        return {"ray_address": self.cluster.address, "ray_nodes": sorted(self.held.values()),
                "ray_resource": self.resource}  # fmt: skip


def prepare(args: Any, timeout: float) -> NodeWatch:
    """For ``--distributed-executor-backend ray``: join the cluster, check that vLLM can place
    its workers on it here, and wait until it offers tensor x pipeline devices."""
    from vllm.platforms import current_platform

    cluster = RayCluster.join()
    view = cluster.view()
    logger.info("joined the Ray cluster at %s: %s", cluster.address, view.describe())
    device = str(getattr(current_platform, "ray_device_key", "") or "")
    if not device:
        # vLLM's own check (ray_utils.initialize_ray_cluster) fails later with "current
        # platform cpu does not support ray"; this says what to do instead.
        raise ConfigurationError(
            f"joined the Ray cluster at {cluster.address} ({view.describe()}), but vLLM on the "
            f"{current_platform.device_name} platform cannot place its workers on Ray (the "
            "platform has no Ray device resource); use --distributed-executor-backend mp for "
            "tensor or pipeline parallel on one machine, or GPU nodes for a Ray cluster",
            param=PARAM,
        )
    tp, pp = int(args.tensor_parallel_size), int(args.pipeline_parallel_size)
    cluster.wait_for(device, tp * pp, timeout=timeout,
                     needed_by=f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp}")  # fmt: skip
    return cluster.watch(device)
