"""The event loop the server runs on: uvloop where it is installed, as uvicorn's ``--loop auto``
and vLLM's server choose, else asyncio's own.

``LMSERVE_EVENT_LOOP=asyncio`` (or ``uvloop``) picks one explicitly: the benchmarks compare the
two with it, and it is the way back should a library misbehave on uvloop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lmserve_core.errors import ConfigurationError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHOICES = ("auto", "asyncio", "uvloop")
ENV = "LMSERVE_EVENT_LOOP"


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory() -> LoopFactory | None:
    """The factory ``$LMSERVE_EVENT_LOOP`` names (default ``auto``); None for asyncio's default
    loop. Raises ConfigurationError for a name we have no loop for, so callers check it with the
    rest of the configuration, before anything is loaded."""
    choice = (os.environ.get(ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ConfigurationError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio" or (choice == "auto" and importlib.util.find_spec("uvloop") is None):
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise ConfigurationError(f"{ENV}=uvloop, but uvloop is not installed") from exc
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], factory: LoopFactory | None) -> T:
    """``asyncio.run(main)`` on the loop ``factory`` makes (from ``loop_factory()``)."""
    logger.debug("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
