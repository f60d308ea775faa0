"""Finding a model directory and reading the small JSON files that steer serving."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmserve_core.builtin_models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    builtin_cache_dir,
    is_builtin,
    locate_builtin,
)
from lmserve_core.errors import ConfigurationError
from lmserve_core.tasks import Task, infer_task

PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len", "lasttoken", "weightedmean"]


@dataclass(frozen=True)
class ModelSource:
    """Where the model's files are, and what the user called it."""

    path: Path
    display_name: str  # the built-in name, hub id or directory the user gave
    hub_id: str | None = None  # set when the files came from the hub
    # A built-in that must be converted (GGUF) into ``path`` before loading.
    builtin: BuiltinModel | None = None

    @property
    def needs_conversion(self) -> bool:
        return self.builtin is not None and not (self.path / "config.json").is_file()

    def config(self) -> dict[str, Any]:
        """config.json, or the built-in's stand-in until it is converted."""
        if self.needs_conversion and self.builtin is not None:
            return dict(self.builtin.config)
        return read_model_config(self.path)


def resolve_model_source(
    *, model_id: str | None, model_dir: str | None, revision: str | None = None
) -> ModelSource:
    """``--model_id`` (built-in, local path or hub id) wins over ``--model_dir``."""
    if model_id:
        if is_builtin(model_id):
            return _builtin_source(model_id.lower())
        local = Path(model_id).expanduser()
        if local.is_dir():
            return ModelSource(_check_dir(local, "model_id"), model_id)
        return ModelSource(download(model_id, revision), model_id, hub_id=model_id)
    if model_dir:
        return ModelSource(_check_dir(Path(model_dir).expanduser(), "model_dir"), model_dir)
    return _builtin_source(DEFAULT_MODEL)


def _builtin_source(name: str) -> ModelSource:
    model = BUILTIN_MODELS[name]
    located = locate_builtin(name)  # fails early, naming the package, when it is missing
    if model.layout == "gguf":
        return ModelSource(builtin_cache_dir(model), name, builtin=model)
    return ModelSource(located, name)


def _check_dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise ConfigurationError(f"--{flag} {str(path)!r} is not a directory", param=flag)
    config = path / "config.json"
    if not config.is_file():
        raise ConfigurationError(
            f"--{flag} {str(path)!r} has no config.json: not a saved Hugging Face model",
            param=flag,
        )
    if not os.access(config, os.R_OK):
        raise ConfigurationError(f"--{flag}: cannot read {str(config)!r}", param=flag)
    return path


def download(repo_id: str, revision: str | None, flag: str = "model_id") -> Path:
    """A hub repository's files (the local cache with HF_HUB_OFFLINE=1); ``flag`` is the one
    that named it (--model_id, --lora-modules), for the error."""
    # huggingface_hub is light but only needed for hub ids; import it here.
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise ConfigurationError(
            f"--{flag} names a hub model but huggingface_hub is not installed", param=flag
        ) from exc
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                # Weights in safetensors when present; no duplicate formats.
                ignore_patterns=["*.msgpack", "*.h5", "*.ot", "flax_*", "tf_*", "*.onnx"],
            )
        )
    except Exception as exc:
        raise ConfigurationError(
            f"cannot fetch --{flag} {repo_id!r} from the Hugging Face hub "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}",
            param=flag,
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"cannot read {str(path)!r}: {exc}", param="model_dir") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{str(path)!r} is not a JSON object", param="model_dir")
    return data


def read_model_config(path: Path) -> dict[str, Any]:
    return read_json(path / "config.json")


def is_sentence_transformer(path: Path) -> bool:
    return (path / "modules.json").is_file()


ST_CONFIG = "config_sentence_transformers.json"


def _st_config(path: Path) -> dict[str, Any]:
    file = path / ST_CONFIG
    return read_json(file) if file.is_file() else {}


def is_cross_encoder(path: Path, config: dict[str, Any]) -> bool:
    """A sentence-transformers CrossEncoder: ``model_type`` in its config (v5+), or the keys
    older versions wrote into ``config.json``."""
    if _st_config(path).get("model_type") == "CrossEncoder":
        return True
    st = config.get("sentence_transformers")
    return "sbert_ce_default_activation_function" in config or (
        isinstance(st, dict) and "activation_fn" in st
    )


def num_labels(config: dict[str, Any]) -> int | None:
    """The classifier's output count as transformers reads it (``id2label``, else
    ``num_labels``); None when the config says neither."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    value = config.get("num_labels")
    return value if isinstance(value, int) else None


def check_reranker(config: dict[str, Any], name: str) -> None:
    """A reranker scores with one logit (a sentence-transformers CrossEncoder's shape); every
    backend refuses another head the same way, before loading anything."""
    labels = num_labels(config)
    if labels not in (None, 1):
        raise ConfigurationError(
            f"{name!r} has {labels} output labels; --task rerank needs a cross-encoder with "
            "one (serve it with --task sequence_classification)",
            param="task",
        )


def infer_model_task(path: Path, config: dict[str, Any]) -> Task:
    """The task a model's files say it does (``infer_task`` over what they contain)."""
    return infer_task(
        config.get("architectures"),
        is_sentence_transformer=is_sentence_transformer(path),
        is_cross_encoder=is_cross_encoder(path, config),
        num_labels=num_labels(config),
    )


ScoreActivation = Literal["sigmoid", "identity", "tanh"]
# sentence-transformers stores the activation as an import path; these are torch's.
_ACTIVATIONS: dict[str, ScoreActivation] = {
    "Sigmoid": "sigmoid",
    "Identity": "identity",
    "Tanh": "tanh",
}


def cross_encoder_activation(path: Path, config: dict[str, Any]) -> ScoreActivation:
    """The activation ``CrossEncoder.predict`` applies to a one-label model's logit: the one
    its config names (v4+: ``config_sentence_transformers.json`` or ``config.json``'s
    ``sentence_transformers``; before: ``sbert_ce_default_activation_function``), else
    sigmoid, as sentence-transformers defaults for one label."""
    named = _st_config(path).get("activation_fn")
    st = config.get("sentence_transformers")
    if named is None and isinstance(st, dict):
        named = st.get("activation_fn")
    if named is None:
        named = config.get("sbert_ce_default_activation_function")
    if named is None:
        return "sigmoid"
    short = str(named).rsplit(".", 1)[-1]
    if short not in _ACTIVATIONS:
        raise ConfigurationError(
            f"the cross-encoder's activation {named!r} is not one lmserve applies "
            f"({', '.join(sorted(_ACTIVATIONS))})",
            param="model_dir",
        )
    return _ACTIVATIONS[short]


def matryoshka_dimensions(path: Path, config: dict[str, Any]) -> tuple[int, ...] | None:
    """The output sizes a Matryoshka embedding model was trained to give, as vLLM reads them
    (``matryoshka_dimensions`` in ``config.json``, or ``is_matryoshka``: any size) and as a
    sentence-transformers config may declare them; None when the model declares none.
    An empty tuple means any size up to the full one."""
    for source in (config, _st_config(path)):
        dims = source.get("matryoshka_dimensions")
        if isinstance(dims, list) and dims and all(isinstance(d, int) and d > 0 for d in dims):
            return tuple(sorted(set(dims)))
        if source.get("is_matryoshka") is True:
            return ()
    return None


@dataclass(frozen=True)
class PoolingConfig:
    mode: PoolingMode = "mean"
    normalize: bool = False  # whether the model's modules.json asks for it
    include_prompt: bool = True


def read_pooling_config(path: Path) -> PoolingConfig:
    """Pooling as the sentence-transformers config says; mean when there is none.

    The output is always L2-normalised (KServe's runtime does so), so ``normalize``
    records whether the model asked for it, for metadata only.
    """
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig()
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigurationError(
            f"cannot read {str(modules_file)!r}: {exc}", param="model_dir"
        ) from exc
    if not isinstance(modules, list):
        raise ConfigurationError(f"{str(modules_file)!r} is not a JSON list", param="model_dir")
    mode: PoolingMode = "mean"
    normalize = False
    for module in modules:
        if not isinstance(module, dict):
            continue
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            cfg = read_json(path / str(module.get("path", "")) / "config.json")
            mode = _pooling_mode(cfg)
        elif kind.endswith("Normalize"):
            normalize = True
    return PoolingConfig(mode=mode, normalize=normalize)


def _pooling_mode(cfg: dict[str, Any]) -> PoolingMode:
    if isinstance(cfg.get("pooling_mode"), str):
        name = cfg["pooling_mode"]
        table: dict[str, PoolingMode] = {
            "mean": "mean", "cls": "cls", "max": "max", "lasttoken": "lasttoken",
            "mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean": "weightedmean",
        }  # fmt: skip
        if name in table:
            return table[name]
    for key, mode in (
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
        ("pooling_mode_lasttoken", "lasttoken"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_mean_tokens", "mean"),
    ):
        if cfg.get(key):
            return mode  # type: ignore[return-value]
    return "mean"


def config_max_length(config: dict[str, Any]) -> int | None:
    """The context limit a model config declares, if any."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
