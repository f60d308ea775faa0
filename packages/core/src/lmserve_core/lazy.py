"""PEP 562 lazy exports: a package names what it exports and where each name lives, and the
module behind a name is imported on first use (numpy, torch or FastAPI stay unloaded until a
caller needs them). Shared by every lmserve package's ``__init__``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that imports ``where[name]`` on first use and
    keeps the value in the package's namespace (later look-ups do not come back here)."""

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
