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

from pydantic import ValidationError
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


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in ServeSettings.model_fields.items():
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
        help_text += f"; default {shown}]" if shown not in (None, False) else "]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            group.add_argument(*_spellings(name, field), action="store_true", **kwargs)
            continue
        # Tasks take pipeline spellings too, so pydantic (not argparse) validates them.
        if isinstance(kind, type) and issubclass(kind, Enum) and kind is not Task:
            kwargs["choices"] = [m.value for m in kind]
        kwargs["metavar"] = name.upper()
        group.add_argument(*_spellings(name, field), **kwargs)


def settings_from_env(environ: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in ServeSettings.model_fields.items():
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
    try:
        values = settings_from_env(os.environ if environ is None else environ)
    except ConfigurationError as exc:
        parser.error(exc.message)
    values.update({k: v for k, v in vars(namespace).items() if k in ServeSettings.model_fields})
    values["engine_args"] = tuple(engine_args)
    try:
        return ServeSettings(**values)
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
    """Flags lmserve does not know go to the backend that does (vLLM), or are an error."""
    if not leftovers:
        return []
    check = _engine_entry("lmserve.engine_args")
    if check is None:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    checked: list[str] = check(leftovers)
    return checked


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lmserve", description="lmserve: a serving runtime for Hugging Face models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve", help="serve a model (lmserve serve --help for every flag)", add_help=False
    )
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "serve":
        serve_main(rest, prog="lmserve serve")
        return
    parser.error(f"unknown command {command!r} (choose from: serve)")


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
