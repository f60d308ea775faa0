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
    parser: argparse.ArgumentParser, namespace: argparse.Namespace, environ: Any = None
) -> ServeSettings:
    """Environment first, command line over it; errors name the flag and exit 2."""
    try:
        values = settings_from_env(os.environ if environ is None else environ)
    except ConfigurationError as exc:
        parser.error(exc.message)
    values.update({k: v for k, v in vars(namespace).items() if k in ServeSettings.model_fields})
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    add_settings_arguments(parser)
    return parser


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
    namespace = parser.parse_args(list(argv))
    settings = build_settings(parser, namespace)
    from lmserve_server.runner import run

    raise SystemExit(run(settings))
