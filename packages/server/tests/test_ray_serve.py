"""lmserve_server.ray_serve without a cluster: replica settings, deployment options, the
Serve config file's application builder, the replica header. Replicas on a real two-node
cluster: tests/test_ray_e2e.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from lmserve_core.settings import ServeSettings
from lmserve_server.cli import main
from lmserve_server.ray_serve import (
    ReplicaSettings,
    _TagReplica,
    build_app,
    deployment_options,
)

ROOT = Path(__file__).resolve().parents[3]


def test_fixed_replicas_by_default() -> None:
    options = deployment_options(ServeSettings(), ReplicaSettings(min_replicas=3))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    # What one lmserve admits: running (the larger of seqs and batch) + queued.
    assert options["max_ongoing_requests"] == 32 + 256
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    assert options["graceful_shutdown_timeout_s"] == 30


def test_autoscaling_between_min_and_max_on_in_flight_requests() -> None:
    settings = ServeSettings(max_queued_requests=4, max_num_seqs=2, max_batch_size=2)
    replicas = ReplicaSettings(min_replicas=1, max_replicas=5, target_ongoing_requests=50,
                               upscale_delay_s=0, replica_num_gpus=1, max_replicas_per_node=1)  # fmt: skip
    options = deployment_options(settings, replicas)
    assert "num_replicas" not in options and options["max_replicas_per_node"] == 1
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["upscale_delay_s"]) == (
        1,
        5,
        0,
    )
    # The target cannot exceed what a replica is sent at most.
    assert options["max_ongoing_requests"] == 6 and scaling["target_ongoing_requests"] == 6
    assert options["ray_actor_options"]["num_gpus"] == 1


def test_max_below_min_is_refused() -> None:
    with pytest.raises(ValidationError, match="--max_replicas 1 is below --min_replicas 2"):
        ReplicaSettings(min_replicas=2, max_replicas=1)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--enable_grpc"], "replicas on Ray Serve are reached over HTTP only"),
        (["--min_replicas", "2", "--max_replicas", "1"], "--max_replicas 1 is below"),
        (["--min_replicas", "0"], "--min_replicas"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ],
)
def test_serve_ray_bad_flags_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve-ray", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_the_serve_config_file_builds_lmserve_replicas() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    (app,) = schema.applications
    assert app.import_path == "lmserve_server.ray_serve:build_app"
    application = build_app(app.args)
    deployment = application._bound_deployment  # what Ray Serve would deploy
    assert deployment.name == "lmserve"
    settings = deployment.init_args[0]
    assert (settings.model_id, settings.model_name, settings.max_batch_size) == (
        "all-minilm-l6-v2",
        "minilm",
        32,
    )
    assert settings.enable_grpc is False
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
        1,
        4,
        8,
    )
    assert deployment.ray_actor_options["num_cpus"] == 2


def test_build_app_refuses_unknown_replica_settings() -> None:
    with pytest.raises(SystemExit):
        build_app({"lmserve_args": "--model_dir /m", "replicas": 2})


def test_every_response_names_its_replica_and_node() -> None:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]})
        await send({"type": "http.response.body", "body": b"x"})

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(_TagReplica(app, "r1", "n1")({"type": "http"}, None, record))
    assert sent[0]["headers"] == [
        (b"a", b"1"),
        (b"x-lmserve-replica", b"r1"),
        (b"x-lmserve-node", b"n1"),
    ]
    assert sent[1] == {"type": "http.response.body", "body": b"x"}
