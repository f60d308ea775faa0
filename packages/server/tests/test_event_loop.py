"""The server's event loop: uvloop when installed (the default install has it), asyncio's when
``LMSERVE_EVENT_LOOP=asyncio``, a configuration error naming the variable otherwise."""

from __future__ import annotations

import asyncio

import pytest

from lmserve_core.errors import ConfigurationError
from lmserve_server import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")  # a declared dependency of lmserve-server off Windows
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_is_chosen_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")
    monkeypatch.setenv(event_loop.ENV, " UVLOOP ")
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_an_unknown_loop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    main = _loop_module()
    with pytest.raises(ConfigurationError, match="LMSERVE_EVENT_LOOP='trio'"):
        event_loop.run(main)
    assert main.cr_frame is None  # closed, not left to warn "never awaited"
