"""The ``lmserve`` command line: ``serve``, ``serve-ray`` and ``export``.

Every subcommand's flags come from a settings model through ``lmserve_server.flags`` (both
spellings, ``LMSERVE_*`` environment twins); unknown flags exit 2 with usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lmserve_core.errors import ConfigurationError
from lmserve_core.settings import ExportSettings
from lmserve_server.flags import (
    add_settings_arguments,
    build_model,
    build_settings,
    check_engine_args,
    engine_entry,
    serve_parser,
)

__all__ = ["build_settings", "check_engine_args", "export_parser", "main", "serve_parser"]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lmserve", description="lmserve: a serving runtime for Hugging Face models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve", help="serve a model (lmserve serve --help for every flag)", add_help=False
    )
    sub.add_parser(
        "serve-ray",
        help="serve a model as Ray Serve replicas behind one ingress (lmserve serve-ray --help)",
        add_help=False,
    )
    sub.add_parser(
        "export", help="write an encoder as a Triton ONNX model repository", add_help=False
    )
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "serve":
        serve_main(rest, prog="lmserve serve")
        return
    if command == "serve-ray":
        serve_ray_main(rest, prog="lmserve serve-ray")
        return
    if command == "export":
        export_main(rest, prog="lmserve export")
        return
    parser.error(f"unknown command {command!r} (choose from: serve, serve-ray, export)")


def serve_main(argv: Sequence[str], prog: str = "lmserve serve") -> None:
    parser = serve_parser(prog)
    namespace, leftovers = parser.parse_known_args(list(argv))
    if getattr(namespace, "help_engine", False):
        helper = engine_entry("lmserve.engine_help")
        print(helper() if helper else "no engine backend (vLLM) is installed")
        raise SystemExit(0)
    engine_args = check_engine_args(parser, leftovers)
    settings = build_settings(parser, namespace, engine_args=engine_args)
    from lmserve_server.runner import run

    raise SystemExit(run(settings))


def serve_ray_parser(prog: str = "lmserve serve-ray") -> argparse.ArgumentParser:
    from lmserve_server.ray_serve import ReplicaSettings

    parser = serve_parser(prog)
    parser.description = (
        "Serve a model as lmserve replicas on Ray Serve: the same routes as `lmserve serve`, "
        "behind one HTTP ingress on --host:--http_port, each replica with its own copy of the "
        "model, autoscaled on in-flight requests. Needs lmserve-server[ray]. (No gRPC: Ray "
        "Serve's proxy speaks HTTP here.)"
    )
    add_settings_arguments(parser, ReplicaSettings)
    return parser


def serve_ray_main(argv: Sequence[str], prog: str = "lmserve serve-ray") -> None:
    """Exit 0 after a clean stop, 1 when the replicas could not start, 2 for a bad flag."""
    try:
        from lmserve_server.ray_serve import ReplicaSettings, run
    except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
        print(f"{prog}: error: {exc}; install lmserve-server[ray]", file=sys.stderr)
        raise SystemExit(2) from None
    parser = serve_ray_parser(prog)
    namespace, leftovers = parser.parse_known_args(list(argv))
    if getattr(namespace, "enable_grpc", False):
        parser.error("--enable_grpc: replicas on Ray Serve are reached over HTTP only")
    engine_args = check_engine_args(parser, leftovers)
    settings = build_settings(parser, namespace, engine_args=engine_args)
    if settings.api_workers > 1:  # Ray Serve's proxy is the front end; replicas scale out
        parser.error(f"--api_workers {settings.api_workers}: not with serve-ray (use "
                     "--min_replicas; Ray Serve's proxy does the HTTP work)")  # fmt: skip
    replicas = build_model(parser, namespace, ReplicaSettings)
    try:
        raise SystemExit(run(settings, replicas))
    except ConfigurationError as exc:
        parser.error(exc.message)


def export_parser(prog: str = "lmserve export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write an encoder model as a Triton model repository: "
        "OUTPUT/MODEL_NAME/config.pbtxt and OUTPUT/MODEL_NAME/1/model.onnx (dynamic batch and "
        "sequence axes). ONNX Runtime is checked against PyTorch first; nothing is written "
        "when they differ by more than 1e-4.",
        allow_abbrev=False,
    )
    add_settings_arguments(parser, ExportSettings)
    return parser


def export_settings(argv: Sequence[str], prog: str = "lmserve export") -> ExportSettings:
    """``lmserve export``'s flags over their ``LMSERVE_*`` twins (exit 2 naming a bad one)."""
    parser = export_parser(prog)
    return build_model(parser, parser.parse_args(list(argv)), ExportSettings)


def _exporter(name: str) -> Any:
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group="lmserve.exporters"):
        if ep.name == name:
            return ep.load()
    return None


def export_main(argv: Sequence[str], prog: str = "lmserve export") -> None:
    """Exit 0 when written, 2 for a bad flag or model (the message names the flag), 1 when
    ONNX Runtime and PyTorch disagree."""
    from pathlib import Path

    from lmserve_core.errors import LmserveError
    from lmserve_core.model_files import infer_model_task, resolve_model_source
    from lmserve_core.tasks import parse_task

    parser = export_parser(prog)
    ns = build_model(parser, parser.parse_args(list(argv)), ExportSettings)
    export_onnx = _exporter("onnx")
    if export_onnx is None:
        parser.error("no ONNX exporter is installed (it comes with lmserve-backend-hf)")

    def progress(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)

    try:
        if not ns.model_dir and not ns.model_id:
            raise ConfigurationError("name the model with --model_dir or --model_id")
        source = resolve_model_source(model_id=ns.model_id, model_dir=ns.model_dir, revision=None)
        if ns.task:
            task = parse_task(ns.task)
        else:
            task = infer_model_task(source.path, source.config())
            progress(f"task {task.value} (from the model config; --task overrides it)")
        report = export_onnx(
            source.path,
            task,
            ns.tensor_input_names.split(","),
            Path(ns.output),
            model_name=ns.model_name,
            max_batch_size=ns.max_batch_size,
            opset=ns.opset,
            progress=progress,
        )
    except ConfigurationError as exc:
        parser.error(exc.message)
    except LmserveError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(
        f"wrote {report.config_path} and {report.onnx_path} ({report.exporter} exporter, "
        f"opset {report.opset}, max abs diff {report.max_abs_diff:.1e}, {report.seconds:.1f} s)"
    )
    # The tensor contract, as Triton will see it: what a Triton operator checks against
    # config.pbtxt and against lmserve's GET /v2/models/{name} in transformer mode.
    describe = getattr(report, "describe_tensors", None)
    for line in describe() if describe else []:
        print(line)
