"""The ``lmserve`` command line, generated from ServeSettings.

Every settings field is a flag in both spellings (``--model_name`` / ``--model-name``)
with an ``LMSERVE_*`` environment twin; unknown flags exit 2 with usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Sequence
from enum import Enum
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lmserve_core.errors import ConfigurationError
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

ENV_PREFIX = "LMSERVE_"
_GROUP_TITLES = {
    "model": "model",
    "tokenizer": "tokenization",
    "generation": "generation (OpenAI completions and chat)",
    "outputs": "outputs (encoder tasks)",
    "predictor": "Triton predictor (transformer mode)",
    "server": "server",
    "security": "security",
    "logging": "logging",
    "scale-out": "scale-out (Ray)",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; enums and plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _spellings(name: str, field: FieldInfo) -> list[str]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    names = [name, *typing.cast(list[str], extra.get("aliases", []))]
    flags: list[str] = []
    for n in names:
        for spelled in (f"--{n}", f"--{n.replace('_', '-')}"):
            if spelled not in flags:
                flags.append(spelled)
    return flags


def add_settings_arguments(
    parser: argparse.ArgumentParser, model: type[BaseModel] = ServeSettings
) -> None:
    """A flag per field of ``model`` (ServeSettings, or serve-ray's ReplicaSettings)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            continue
        group_key = str(extra.get("group", "model"))
        if group_key not in groups:
            groups[group_key] = parser.add_argument_group(_GROUP_TITLES.get(group_key, group_key))
        group = groups[group_key]
        kind = _base_type(field.annotation)
        default = field.default
        shown = default.value if isinstance(default, Enum) else default
        env = ENV_PREFIX + name.upper()
        help_text = f"{field.description} [env {env}"
        # `is`, not `in`: a default of 0 equals False yet is worth showing.
        help_text += f"; default {shown}]" if shown is not None and shown is not False else "]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            group.add_argument(*_spellings(name, field), action="store_true", **kwargs)
            continue
        # Tasks take pipeline spellings too, so pydantic (not argparse) validates them.
        if isinstance(kind, type) and issubclass(kind, Enum) and kind is not Task:
            kwargs["choices"] = [m.value for m in kind]
        kwargs["metavar"] = name.upper()
        group.add_argument(*_spellings(name, field), **kwargs)


def settings_from_env(
    environ: os._Environ[str] | dict[str, str], model: type[BaseModel] = ServeSettings
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            continue
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if _base_type(field.annotation) is bool:
            low = raw.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ConfigurationError(
                    f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean", param=name
                )
            values[name] = low in _TRUE
        else:
            values[name] = raw
    return values


def build_settings(
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    environ: Any = None,
    engine_args: Sequence[str] = (),
) -> ServeSettings:
    """Environment first, command line over it; errors name the flag and exit 2."""
    return build_model(parser, namespace, ServeSettings, environ,
                       extra={"engine_args": tuple(engine_args)})  # fmt: skip


M = typing.TypeVar("M", bound=BaseModel)


def build_model(
    parser: argparse.ArgumentParser,
    namespace: argparse.Namespace,
    model: type[M],
    environ: Any = None,
    extra: dict[str, Any] | None = None,
) -> M:
    """``model`` from its ``LMSERVE_*`` variables and, over them, the flags given."""
    try:
        values = settings_from_env(os.environ if environ is None else environ, model)
    except ConfigurationError as exc:
        parser.error(exc.message)
    values.update({k: v for k, v in vars(namespace).items() if k in model.model_fields})
    values.update(extra or {})
    try:
        return model(**values)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            flag = "--" + ".".join(str(p) for p in err["loc"])
            messages.append(f"{flag}: {err['msg']}")
        parser.error("; ".join(messages))
    except ConfigurationError as exc:
        parser.error(exc.message)


def serve_parser(prog: str = "lmserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a Hugging Face model over OpenAI, KServe V1 and Open Inference "
        "Protocol V2. With no model flag, serves the built-in smollm2-135m-instruct.",
        epilog="Every `vllm serve` engine flag (--tensor-parallel-size, --enforce-eager, "
        "--kv-cache-memory-bytes, ...) is accepted too and reaches the vLLM engine; "
        "`lmserve serve --help-engine` lists them with vLLM's own descriptions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--help-engine", action="store_true", default=argparse.SUPPRESS,
                        help="list the vLLM engine flags and exit")  # fmt: skip
    add_settings_arguments(parser)
    return parser


def _engine_entry(group: str) -> Any:
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group=group):
        return ep.load()
    return None


def check_engine_args(parser: argparse.ArgumentParser, leftovers: list[str]) -> list[str]:
    """Flags lmserve does not know go to the backend that does (vLLM); what neither knows is
    reported with lmserve's own usage."""
    if not leftovers:
        return []
    check = _engine_entry("lmserve.engine_args")
    unknown: list[str] = leftovers if check is None else check(leftovers)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return leftovers


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
        helper = _engine_entry("lmserve.engine_help")
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

    def add(name: str, *, help: str, default: Any = None, required: bool = False,
            **kwargs: Any) -> None:  # fmt: skip
        """Both spellings, and the same ``LMSERVE_*`` environment twin as ``serve``'s flag."""
        flags = dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))
        env = ENV_PREFIX + name.upper()
        from_env = os.environ.get(env)
        shown = f"; default {default}" if default is not None else ""
        parser.add_argument(
            *flags, dest=name, help=f"{help} [env {env}{shown}]",
            default=kwargs.get("type", str)(from_env) if from_env else default,
            required=required and not from_env, **kwargs,
        )  # fmt: skip

    add("model_dir", metavar="DIR", help="local directory of a saved Hugging Face model")
    add("model_id", metavar="ID",
        help="Hugging Face model id or built-in name (all-minilm-l6-v2); wins over --model_dir")  # fmt: skip
    add("task", metavar="TASK",
        help="sequence_classification, token_classification, fill_mask or text_embedding "
        "(pipeline spellings too); inferred from the architecture when absent")  # fmt: skip
    add("tensor_input_names", metavar="NAMES", required=True,
        help="comma list of tokenizer outputs that become the INT64 graph inputs, in this "
        "order, e.g. input_ids,attention_mask")  # fmt: skip
    add("output", metavar="REPO", required=True, help="Triton model repository to write into")
    add("model_name", metavar="NAME", default="model", help="model folder and config name")
    add("max_batch_size", metavar="N", type=int, default=32, help="config.pbtxt max_batch_size")
    add("opset", metavar="N", type=int,
        help="ONNX opset (default: the exporter's own); below 18 uses the TorchScript exporter")  # fmt: skip
    return parser


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
    from lmserve_core.model_files import is_sentence_transformer, resolve_model_source
    from lmserve_core.tasks import infer_task, parse_task

    parser = export_parser(prog)
    ns = parser.parse_args(list(argv))
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
            task = infer_task(
                source.config().get("architectures"),
                is_sentence_transformer=is_sentence_transformer(source.path),
            )
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
