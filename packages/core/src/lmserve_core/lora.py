"""LoRA adapters: vLLM's ``--lora-modules``, the PEFT folders they name, and the registry of
served adapters that the model host keeps (names, engine ids, requests in flight).

An adapter is served under its own name next to the base model's: a request picks it with
``model``. Backends receive a ``LoRAAdapter`` (``AdapterBackend.add_adapter``) and find it again
on each request (``GenerationRequest.adapter``); the registry never touches weights.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lmserve_core.errors import ConfigurationError, Conflict, InvalidInput, ModelNotFound

LORA_MODULES_FLAG = "lora_modules"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` entry: ``name=path`` or vLLM's JSON form
    ``{"name": ..., "path": ..., "base_model_name": ...}``. ``path`` is a local folder or a hub id."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_modules(values: Iterable[str]) -> list[LoRAModule]:
    """The entries of ``--lora-modules`` in both of vLLM's forms; ConfigurationError names the
    flag and the entry at fault."""
    modules: list[LoRAModule] = []
    for value in values:
        modules.append(_parse_one(value.strip()))
    seen: set[str] = set()
    for module in modules:
        if module.name in seen:
            raise ConfigurationError(
                f"--lora-modules names the adapter {module.name!r} twice", param=LORA_MODULES_FLAG
            )
        seen.add(module.name)
    return modules


def _parse_one(value: str) -> LoRAModule:
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"--lora-modules {value!r} is not valid JSON: {exc}", param=LORA_MODULES_FLAG
            ) from exc
        unknown = set(data) - {"name", "path", "base_model_name"} if isinstance(data, dict) else ()
        if not isinstance(data, dict) or unknown:
            raise ConfigurationError(
                f"--lora-modules {value!r}: the JSON form takes 'name', 'path' and optionally "
                "'base_model_name'", param=LORA_MODULES_FLAG,
            )  # fmt: skip
        name, path, base = data.get("name"), data.get("path"), data.get("base_model_name")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"--lora-modules {value!r} needs a non-empty 'name' and 'path'",
                param=LORA_MODULES_FLAG,
            )
        if base is not None and not isinstance(base, str):
            raise ConfigurationError(
                f"--lora-modules {value!r}: 'base_model_name' must be a string",
                param=LORA_MODULES_FLAG,
            )
        return LoRAModule(name, path, base)
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise ConfigurationError(
            f"--lora-modules {value!r} is neither name=path nor a JSON object with 'name' and "
            "'path'", param=LORA_MODULES_FLAG,
        )  # fmt: skip
    return LoRAModule(name, path)


@dataclass(frozen=True)
class LoRAAdapter:
    """A served adapter, checked and resolved to a local folder.

    ``int_id`` is vLLM's ``lora_int_id``: unique per load, never reused, so an engine that keeps
    adapters cached by id never serves old weights under a reloaded name.
    """

    name: str
    int_id: int
    path: str  # the local PEFT folder
    source: str  # what the user gave (a folder or a hub id): the model card's "root"
    rank: int
    base_model_name: str | None = None
    target_modules: tuple[str, ...] = ()
    task_type: str | None = None


@runtime_checkable
class AdapterBackend(Protocol):
    """A backend that serves LoRA adapters next to its base model."""

    async def add_adapter(self, adapter: LoRAAdapter) -> None:
        """Load ``adapter`` so that requests naming it can run; InvalidInput when its weights do
        not fit this model (other architecture, unknown modules), the backend's words kept."""
        ...

    async def remove_adapter(self, adapter: LoRAAdapter) -> None:
        """Drop ``adapter`` (nothing in flight uses it any more)."""
        ...


def local_adapter_dir(source: str) -> Path | None:
    """``source`` as a local folder, or None when it must be a hub id."""
    path = Path(source).expanduser()
    if path.exists() or path.is_absolute() or source.startswith((".", "~")):
        return path
    return None


def read_adapter_config(directory: Path, *, max_rank: int) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA folder, checked: InvalidInput says what is wrong (a
    missing folder is ModelNotFound, as vLLM's LoRAAdapterNotFoundError)."""
    if not directory.is_dir():
        raise ModelNotFound(f"no LoRA adapter folder at {str(directory)!r}", param="lora_path")
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InvalidInput(
            f"{str(directory)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter", param="lora_path"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {str(config_path)!r}: {exc}", param="lora_path") from exc
    if not isinstance(config, dict):
        raise InvalidInput(f"{str(config_path)!r} is not a JSON object", param="lora_path")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidInput(
            f"{str(directory)!r} is a {peft_type or 'untyped'} adapter; only LoRA adapters are "
            "served", param="lora_path",
        )  # fmt: skip
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidInput(
            f"{str(config_path)!r}: 'r' must be a positive integer", param="lora_path"
        )
    if rank > max_rank:
        raise InvalidInput(
            f"the adapter in {str(directory)!r} has rank {rank}, above --max-lora-rank {max_rank}",
            param="lora_path",
        )
    if not any((directory / name).is_file() for name in ADAPTER_WEIGHTS):
        raise InvalidInput(
            f"{str(directory)!r} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})",
            param="lora_path",
        )
    return config


def target_modules(config: dict[str, Any]) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return (targets,)
    if isinstance(targets, list):
        return tuple(str(t) for t in targets)
    return ()


class _Entry:
    __slots__ = ("adapter", "closing", "idle", "in_flight")

    def __init__(self, adapter: LoRAAdapter) -> None:
        self.adapter = adapter
        self.in_flight = 0
        self.closing = False
        self.idle = asyncio.Event()
        self.idle.set()


class AdapterLease:
    """One request's hold on an adapter; ``release()`` (idempotent) lets an unload go on."""

    __slots__ = ("_entry", "_released")

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry
        self._released = False
        entry.in_flight += 1
        entry.idle.clear()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._entry.in_flight -= 1
        if self._entry.in_flight <= 0:
            self._entry.idle.set()


class AdapterRegistry:
    """The adapters a model host serves, by name. Base names are never adapter names."""

    def __init__(self, base_names: Sequence[str], *, max_adapters: int | None = None) -> None:
        """``max_adapters``: the most served at once (the backend's --max-cpu-loras rule)."""
        self.base_names = tuple(base_names)
        self.max_adapters = max_adapters
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)
        self._locks: dict[str, asyncio.Lock] = {}

    def next_id(self) -> int:
        return next(self._ids)

    def lock(self, name: str) -> asyncio.Lock:
        """Loads and unloads of one name run one at a time (vLLM's per-name lock)."""
        return self._locks.setdefault(name, asyncio.Lock())

    @property
    def adapters(self) -> list[LoRAAdapter]:
        """The servable adapters, in load order."""
        return [e.adapter for e in self._entries.values() if not e.closing]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def get(self, name: str) -> LoRAAdapter | None:
        entry = self._entries.get(name)
        return entry.adapter if entry is not None and not entry.closing else None

    def loaded(self, name: str) -> bool:
        """Registered, even while unloading (a second load of the name is refused then)."""
        return name in self._entries

    def lease(self, name: str) -> AdapterLease:
        entry = self._entries.get(name)
        if entry is None or entry.closing:
            raise ModelNotFound(f"the LoRA adapter {name!r} is not loaded", param="model")
        return AdapterLease(entry)

    def add(self, adapter: LoRAAdapter) -> None:
        self.check_room(adapter.name)
        self._entries[adapter.name] = _Entry(adapter)

    def check_room(self, name: str) -> None:
        """Raise the error ``add`` would, before any weights are read."""
        if name in self.base_names:
            raise InvalidInput(
                f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name"
            )
        full = self.max_adapters is not None and len(self._entries) >= self.max_adapters
        if name not in self._entries and full:
            raise InvalidInput(
                f"{len(self._entries)} adapters are loaded, the most this server holds "
                f"(--max-cpu-loras {self.max_adapters}); unload one first",
                param="lora_name",
            )

    async def drain(self, name: str, timeout: float) -> LoRAAdapter:
        """Stop new requests for ``name`` and wait for those in flight; on timeout the adapter
        serves again and ``Conflict`` says how many requests still hold it."""
        entry = self._entries.get(name)
        if entry is None or entry.closing:
            raise ModelNotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
        entry.closing = True
        if entry.in_flight == 0:  # wait_for(..., 0) would time out even on a set event
            return entry.adapter
        try:
            await asyncio.wait_for(entry.idle.wait(), timeout)
        except TimeoutError:
            entry.closing = False
            raise Conflict(
                f"the LoRA adapter {name!r} still has {entry.in_flight} request(s) in flight "
                f"after {timeout:.0f} s; it stays loaded, retry the unload later"
            ) from None
        return entry.adapter

    def replace(self, adapter: LoRAAdapter) -> AdapterLeases | None:
        """Serve ``adapter`` under its name from now on (a load in place); the leases of the
        adapter it replaces, which the caller waits for before freeing its weights."""
        old = self._entries.get(adapter.name)
        self._entries[adapter.name] = _Entry(adapter)
        return None if old is None else AdapterLeases(old)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)


class AdapterLeases:
    """What still holds a replaced adapter."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry

    @property
    def adapter(self) -> LoRAAdapter:
        return self._entry.adapter

    async def released(self) -> None:
        """Once no request holds it any more."""
        await self._entry.idle.wait()
