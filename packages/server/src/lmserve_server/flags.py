"""Settings models as command lines: one mechanism for every ``lmserve`` subcommand.

Each field of a pydantic settings model (``ServeSettings``, serve-ray's ``ReplicaSettings``,
``ExportSettings``) is a flag in both spellings (``--model_name`` / ``--model-name``) with an
``LMSERVE_*`` environment twin; the command line wins over the environment, pydantic validates
both, and an error names the flag (exit 2 with usage). Field metadata comes from
``lmserve_core.settings.flag``.
"""

from __future__ import annotations

import argparse
import os
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
from lmserve_server import vllm_flags

ENV_PREFIX = "LMSERVE_"
_GROUP_TITLES = {
    "model": "model",
    "tokenizer": "tokenization",
    "generation": "generation (OpenAI completions and chat)",
    "openai": "vLLM's OpenAI server flags (both backends)",
    "lora": "LoRA adapters (vLLM's flags, both backends)",
    "outputs": "outputs (encoder tasks)",
    "predictor": "Triton predictor (transformer mode)",
    "server": "server",
    "security": "security",
    "logging": "logging",
    "scale-out": "scale-out (Ray)",
    "export": "export",
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


def _boolean(raw: str) -> bool:
    low = raw.strip().lower()
    if low not in _TRUE | _FALSE:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean (true or false)")
    return low in _TRUE


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
            # `--flag` alone says true; `--flag false` (KServe's `--enable_grpc false`) false.
            group.add_argument(*_spellings(name, field), nargs="?", const=True, type=_boolean,
                               metavar="true|false", **kwargs)  # fmt: skip
            continue
        if typing.get_origin(kind) is list:  # vLLM's syntax: --served-model-name A B
            kwargs["nargs"] = "+"
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
        kind = _base_type(field.annotation)
        if kind is bool:
            try:
                values[name] = _boolean(raw)
            except argparse.ArgumentTypeError:
                raise ConfigurationError(
                    f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean", param=name
                ) from None
        elif typing.get_origin(kind) is list:
            values[name] = raw.replace(",", " ").split()  # "a b" or "a,b"
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


def engine_entry(group: str) -> Any:
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group=group):
        return ep.load()
    return None


def check_engine_args(parser: argparse.ArgumentParser, leftovers: list[str]) -> list[str]:
    """Flags lmserve does not know go to the backend that does (vLLM); what neither knows is
    reported with lmserve's own usage."""
    if not leftovers:
        return []
    refused = vllm_flags.refusal(leftovers)
    if refused is not None:
        parser.error(refused)
    check = engine_entry("lmserve.engine_args")
    unknown: list[str] = leftovers if check is None else check(leftovers)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return leftovers
