"""Replica scale-out on Ray Serve: lmserve replicas behind one Ray Serve HTTP ingress.

Every replica is a whole lmserve app (the same routes, settings, limits and metrics) holding
its own copy of the model. Ray Serve's proxy sends each request to a replica with few requests
in flight, and its autoscaler keeps ``target_ongoing_requests`` in flight per replica between
``min_replicas`` and ``max_replicas``. Any task and backend works: a vLLM replica asks Ray
for its GPUs with ``--replica_num_gpus``.

Three ways in: ``lmserve serve-ray`` (the ``lmserve serve`` flags plus the ones of
``ReplicaSettings``); ``serve run lmserve_server.ray_serve:build_app lmserve_args="..."``; and a
Ray Serve config file (``serve deploy``, KubeRay's RayService) with that same import path.

Ray itself is imported only when an application is built or run (``lmserve-server[ray]``).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import threading
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve_core.backend import DEFAULT_BATCH_SIZE
from lmserve_core.errors import ConfigurationError
from lmserve_core.model_host import ModelHost, ModelState
from lmserve_core.settings import ServeSettings, flag

logger = logging.getLogger("lmserve.ray")

REPLICA_HEADER = b"x-lmserve-replica"
NODE_HEADER = b"x-lmserve-node"


class ProxyLocation(StrEnum):
    EveryNode = "EveryNode"
    HeadOnly = "HeadOnly"


def _replica_flag(description: str) -> Any:
    return flag(description, group="ray serve replicas")


class ReplicaSettings(BaseModel):
    """How many lmserve replicas Ray Serve runs, and what each one asks Ray for."""

    model_config = ConfigDict(extra="forbid")

    ray_address: Annotated[
        str | None,
        Field(**_replica_flag(
            "Ray cluster to deploy on (host:port of its head). Default: RAY_ADDRESS, else a "
            "single-node Ray started for this command and stopped with it."
        )),
    ] = None  # fmt: skip
    min_replicas: Annotated[
        int, Field(ge=1, **_replica_flag("Replicas to run (the lower bound when autoscaling)."))
    ] = 1
    max_replicas: Annotated[
        int | None,
        Field(ge=1, **_replica_flag(
            "Autoscale up to this many replicas on in-flight requests (default: no "
            "autoscaling, exactly --min_replicas)."
        )),
    ] = None  # fmt: skip
    target_ongoing_requests: Annotated[
        float,
        Field(gt=0, **_replica_flag(
            "Autoscaling target: requests in flight per replica (queued ones included)."
        )),
    ] = 4  # fmt: skip
    max_ongoing_requests: Annotated[
        int | None,
        Field(ge=1, **_replica_flag(
            "Most requests Ray Serve sends one replica at a time (default: what one lmserve "
            "admits, running plus --max_queued_requests; lmserve answers 429 beyond it)."
        )),
    ] = None  # fmt: skip
    upscale_delay_s: Annotated[
        float,
        Field(ge=0, **_replica_flag("Seconds the load must stay above target before a scale-up.")),
    ] = 30
    downscale_delay_s: Annotated[
        float,
        Field(
            ge=0, **_replica_flag("Seconds the load must stay below target before a scale-down.")
        ),
    ] = 600
    replica_num_cpus: Annotated[
        float, Field(ge=0, **_replica_flag("CPUs Ray reserves for each replica."))
    ] = 1
    replica_num_gpus: Annotated[
        float,
        Field(ge=0, **_replica_flag("GPUs Ray reserves for each replica (1 for a vLLM replica).")),
    ] = 0
    proxy_location: Annotated[
        ProxyLocation,
        Field(**_replica_flag(
            "Where Ray Serve runs its HTTP proxy: EveryNode (each node with a replica; put a "
            "load balancer in front of them) or HeadOnly (one ingress on the head node)."
        )),
    ] = ProxyLocation.EveryNode  # fmt: skip
    max_replicas_per_node: Annotated[
        int | None,
        Field(ge=1, **_replica_flag("Spread replicas: at most this many on one Ray node.")),
    ] = None

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaSettings:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(
                f"--max_replicas {self.max_replicas} is below --min_replicas {self.min_replicas}"
            )
        return self

    @property
    def autoscales(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.min_replicas


def no_code_upload() -> None:
    """Replicas run the lmserve installed on each node (the same image everywhere). Under
    ``uv run`` Ray would otherwise package the current directory, models and caches included,
    and start every worker through ``uv run`` (its uv hook); set before ``import ray``."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def deployment_options(settings: ServeSettings, replicas: ReplicaSettings) -> dict[str, Any]:
    """``serve.deployment`` options: a pure function of the two settings (tested without Ray)."""
    # Unset --max_batch_size: the smallest default batch, so Ray never sends a replica more than
    # it admits (in-process encoders admit 32 more, which Ray then queues itself).
    batch = settings.max_batch_size or DEFAULT_BATCH_SIZE
    admits = max(settings.max_num_seqs, batch) + settings.max_queued_requests
    max_ongoing = replicas.max_ongoing_requests or admits
    options: dict[str, Any] = {
        "name": "lmserve",
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {
            "num_cpus": replicas.replica_num_cpus,
            "num_gpus": replicas.replica_num_gpus,
        },
        # Ray waits this long for a removed replica's requests (streams too) to finish.
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "health_check_period_s": 5,
    }
    if replicas.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = replicas.max_replicas_per_node
    if replicas.autoscales:
        options["autoscaling_config"] = {
            "min_replicas": replicas.min_replicas,
            "initial_replicas": replicas.min_replicas,
            "max_replicas": replicas.max_replicas,
            "target_ongoing_requests": min(replicas.target_ongoing_requests, max_ongoing),
            "upscale_delay_s": replicas.upscale_delay_s,
            "downscale_delay_s": replicas.downscale_delay_s,
        }
    else:
        options["num_replicas"] = replicas.min_replicas
    return options


class _TagReplica:
    """Adds ``x-lmserve-replica`` and ``x-lmserve-node`` to every response: which replica, on
    which Ray node, answered (pure ASGI, so streams pass through untouched)."""

    def __init__(self, app: Any, replica_id: str, node_id: str) -> None:
        self.app = app
        self.headers = [(REPLICA_HEADER, replica_id.encode()), (NODE_HEADER, node_id.encode())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, tagged)


class LmserveReplica:
    """One Ray Serve replica: loads the model in its constructor, so Ray routes to it only
    once it can answer; Ray's health check restarts it if its model or engine dies."""

    # Ray Serve awaits an async constructor, and sends no traffic before it returns.
    async def __init__(self, settings: ServeSettings) -> None:  # type: ignore[misc]
        import ray
        from ray import serve

        from lmserve_server.app import create_app
        from lmserve_server.logs import configure_logging
        from lmserve_server.metrics import Metrics

        configure_logging(settings.log_level, settings.log_format)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        metrics = Metrics()
        self.host = ModelHost.from_settings(settings, observer=metrics)
        self.lmserve_app = create_app(settings, self.host, metrics)
        await self.host.load()
        logger.info("replica %s serves %r", self.replica_id, settings.model_name)

    def __serve_build_asgi_app__(self) -> Any:
        return _TagReplica(self.lmserve_app, self.replica_id, self.node_id)

    def check_health(self) -> None:
        if self.host.state is ModelState.ready and not self.host.ready:
            raise RuntimeError(f"lmserve replica {self.replica_id}: the model backend is unhealthy")

    async def __del__(self) -> None:
        # Ray Serve waited (graceful_shutdown_timeout_s) for the requests it routed here.
        await self.host.drain(self.host.settings.shutdown_timeout)


def build_application(settings: ServeSettings, replicas: ReplicaSettings) -> Any:
    """The Ray Serve application: ``serve.run(build_application(...))``."""
    from ray import serve

    # The replicas serve over Ray Serve's proxy: their own ports and gRPC stay unused.
    settings = settings.model_copy(update={"enable_grpc": False})
    deployment = serve.deployment(
        serve.ingress()(LmserveReplica), **deployment_options(settings, replicas)
    )
    return deployment.bind(settings)  # type: ignore[attr-defined]


def build_app(args: Mapping[str, Any]) -> Any:
    """Ray Serve application builder: ``serve run lmserve_server.ray_serve:build_app
    lmserve_args="--model_dir /models/x --task fill_mask" min_replicas=2``, or the same import
    path and ``args`` in a Serve config file. ``lmserve_args`` are ``lmserve serve`` flags; the
    other keys are ReplicaSettings fields."""
    from lmserve_server.flags import build_model, build_settings, check_engine_args, serve_parser

    args = dict(args)
    parser = serve_parser("lmserve_server.ray_serve:build_app lmserve_args")
    namespace, leftovers = parser.parse_known_args(shlex.split(str(args.pop("lmserve_args", ""))))
    settings = build_settings(parser, namespace, engine_args=check_engine_args(parser, leftovers))
    replicas = build_model(parser, parser.parse_args([]), ReplicaSettings, extra=args)
    return build_application(settings, replicas)


def run(settings: ServeSettings, replicas: ReplicaSettings) -> int:
    """``lmserve serve-ray``: deploy, serve on ``--host``:``--http_port`` until SIGTERM/SIGINT,
    then delete the application (Ray drains each replica for ``--shutdown_timeout`` s)."""
    no_code_upload()
    import ray
    from ray import serve

    from lmserve_server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    try:
        ray.init(address=replicas.ray_address, namespace="lmserve", log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot join the Ray cluster: {exc}", param="ray_address"
        ) from exc
    name = settings.model_name
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=replicas.proxy_location.value,
                    http_options={"host": settings.host, "port": settings.http_port})  # fmt: skip
        options = deployment_options(settings, replicas)
        logger.info("deploying %r on Ray (%s): %s", name, ray.get_runtime_context().gcs_address,
                    {k: v for k, v in options.items() if k != "name"})  # fmt: skip
        serve.run(build_application(settings, replicas), name=name, route_prefix="/")
    except RuntimeError as exc:  # the replicas could not start: Ray says why
        logger.error("the Ray Serve application failed to deploy: %s%s", exc, _why(name))
        _shut_down(name)
        return 1
    # serve.run returns once the application routes; the other replicas may still be loading.
    while not stop.is_set() and _running_replicas(name) < replicas.min_replicas:
        stop.wait(0.5)
    logger.info("serving %r at http://%s:%d through Ray Serve: %d replica(s) running", name,
                settings.host, settings.http_port, _running_replicas(name))  # fmt: skip
    stop.wait()
    logger.info("stopping: draining the replicas (up to %.0f s)", settings.shutdown_timeout)
    _shut_down(name)
    return 0


def _running_replicas(name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[name].deployments["lmserve"]
    return sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")


def _why(name: str) -> str:
    """The replicas' own error (a model that would not load, say), from Serve's status."""
    from ray import serve

    try:
        app = serve.status().applications[name]
        return "".join(f"\n  {d}: {s.message}" for d, s in app.deployments.items() if s.message)
    except Exception:  # the status is a courtesy; the deploy error is already logged
        return ""


def _shut_down(name: str) -> None:
    """Delete this application; stop Serve (its proxies, their port) when no other
    application is left on the cluster."""
    import ray
    from ray import serve

    try:
        serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        ray.shutdown()
