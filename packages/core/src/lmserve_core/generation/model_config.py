"""Facts about a generative model read from its files, shared by every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmserve_core.errors import ConfigurationError
from lmserve_core.model_files import config_max_length, read_json

# generation_config.json fields that become sampling defaults (vLLM's `--generation-config auto`).
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return read_json(file) if file.is_file() else {}


def sampling_defaults(gen_config: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(gen_config[k])
        for k in SAMPLING_DEFAULTS
        if isinstance(gen_config.get(k), int | float)
    }


def token_ids(value: Any) -> set[int]:
    """An ``eos_token_id`` field: an int, a list of ints, or nothing."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, list | tuple):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def read_chat_template(path: str | None) -> str | None:
    """``--chat_template FILE``."""
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read --chat_template {path!r}: {exc}", param="chat_template"
        ) from exc


def max_model_len(
    requested: int | None, config: dict[str, Any], tokenizer_max: Any, *, encoder_decoder: bool
) -> int:
    """The context limit: the model's, or a smaller ``--max_model_len``; larger is refused."""
    declared = config_max_length(config)
    if declared is None:
        ok = isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000
        declared = tokenizer_max if ok else (512 if encoder_decoder else 2048)
    if requested is None:
        return int(declared)
    if requested > declared and not encoder_decoder:
        raise ConfigurationError(
            f"--max_model_len {requested} exceeds the model's context of {declared}",
            param="max_length",
        )
    return requested
