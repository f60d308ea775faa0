"""Build-once, verified cache folders for artefacts trained on top of ``tiny_models``.

``cached(kind, name, build)`` returns ``<CACHE_DIR>/<kind.prefix>-<name>-<kind.digest()>``,
building it on first use as ``tiny_models.model_path`` builds its models: ``build`` trains one
``tiny_models.Attempt`` into a temporary folder and returns what it misses (checked right after
training; empty: verified); a miss trains again with the next attempt (``tiny_models.ATTEMPTS``),
and the last one raises ``TinyModelNotLearned`` naming what did not emerge. The verified folder
gets a ``verified.json`` and is renamed into place under a per-artefact ``fcntl`` lock, so
parallel pytest processes build each once and a folder that exists is always complete. Builds of
the same name under an older hash are removed.

Used by ``lora_adapters`` and ``cross_encoder``; each names its builder file and training
libraries to ``source_hash`` and ``versions``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _support import tiny_models
from _support.tiny_models import VERIFIED_FILE, Attempt, TinyModelNotLearned
from lmserve_core.builtin_models import cache_lock

# Builds one attempt into a folder and returns what is missing from it (empty: verified).
Build = Callable[[Path, Attempt], list[str]]


@dataclass(frozen=True)
class Kind:
    """A family of cached artefacts: how its folders are named, described and recorded."""

    prefix: str  # folders <prefix>-<name>-<hash>, locks .<prefix>-<name>.lock
    description: str  # in messages: "<description> 'name': ..."
    record_key: str  # verified.json names the artefact under this key
    digest: Callable[[], str]  # 12 hex digits; changes whenever the builder could
    versions: Callable[[], dict[str, str]]  # the libraries recorded in verified.json


def versions(libraries: tuple[str, ...]) -> dict[str, str]:
    """The installed versions of ``libraries`` (recorded in verified.json, part of the hash)."""
    return {name: importlib.metadata.version(name) for name in libraries}


def source_hash(builder: str, libraries: tuple[str, ...]) -> str:
    """12 hex digits that change with the ``builder`` file, this cache code, the tiny models'
    builder and the ``libraries``' versions: whatever could change what a build makes."""
    digest = hashlib.sha256()
    for source in (Path(builder), Path(__file__)):
        digest.update(source.read_bytes())
    digest.update(tiny_models.builder_hash().encode())
    digest.update(json.dumps(versions(libraries), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def cached(kind: Kind, name: str, build: Build) -> Path:
    """``<prefix>-<name>-<hash>`` in the tiny models' cache, built once across processes,
    always complete."""
    cache = tiny_models.CACHE_DIR  # looked up now: whatever moves the models moves these too
    target = cache / f"{kind.prefix}-{name}-{kind.digest()}"
    if (target / VERIFIED_FILE).is_file():  # only ever created complete, by rename
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache / f".{kind.prefix}-{name}.lock"):
        if (target / VERIFIED_FILE).is_file():  # another process built it while we waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        _build_verified(kind, name, build, target)
        _remove_stale(kind, name, keep=target)
    return target


def _build_verified(kind: Kind, name: str, build: Build, target: Path) -> None:
    """Train until the artefact shows every checked behaviour, then rename it into ``target``."""
    history: list[str] = []
    missing: list[str] = []
    for attempt in tiny_models.ATTEMPTS:
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind.prefix}-{name}-building-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared
            started = time.monotonic()
            # One thread for the checks as well as the training: with models this small, two
            # threads on a busy two-core machine ran the greedy checks ten times slower.
            with tiny_models._deterministic(attempt.seed):
                missing = build(tmp, attempt)
            if not missing:
                record = {
                    kind.record_key: name,
                    "attempt": attempt.number,
                    "seed": attempt.seed,
                    "epoch_scale": attempt.epoch_scale,
                    "failed_attempts": history,
                    "build_seconds": round(time.monotonic() - started, 1),
                    "threads": tiny_models._training_threads(),
                    "cpu_capability": tiny_models._cpu_capability(),
                    "versions": kind.versions(),
                }
                tiny_models._write_json(tmp / VERIFIED_FILE, record)
                os.rename(tmp, target)
                return
            history.append(f"attempt {attempt.number} (seed {attempt.seed}, "
                           f"x{attempt.epoch_scale} epochs): " + "; ".join(missing))  # fmt: skip
            print(f"{kind.description} {name!r}: {history[-1]}; training again", file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise TinyModelNotLearned(
        f"{kind.description} {name!r} did not learn what the tests assert in {len(history)} "
        "attempts; missing after the last: " + "; ".join(missing)
    )


def _remove_stale(kind: Kind, name: str, keep: Path) -> None:
    """Drop this artefact's builds from older builders (never reused: their hash differs)."""
    stem = f"{kind.prefix}-{name}"
    for old in keep.parent.glob(f"{stem}-*"):
        if (
            old != keep
            and old.is_dir()
            and re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{12}}", old.name)
        ):
            shutil.rmtree(old, ignore_errors=True)
