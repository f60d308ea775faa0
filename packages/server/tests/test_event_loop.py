"""The server's event loop: uvloop when installed (the default install has it), asyncio's when
``LMSERVE_EVENT_LOOP=asyncio``, a configuration error naming the variable otherwise."""

from __future__ import annotations

import asyncio

import pytest

from lmserve_core.errors import ConfigurationError
from lmserve_server import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def _run_on_chosen_loop() -> str:
    return event_loop.run(_loop_module(), event_loop.loop_factory())


def test_auto_runs_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")  # a declared dependency of lmserve-server off Windows
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert _run_on_chosen_loop().startswith("uvloop")


def test_asyncio_is_chosen_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert _run_on_chosen_loop().startswith("asyncio")
    monkeypatch.setenv(event_loop.ENV, " UVLOOP ")
    assert _run_on_chosen_loop().startswith("uvloop")


def test_an_unknown_loop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    with pytest.raises(ConfigurationError, match="LMSERVE_EVENT_LOOP='trio'"):
        event_loop.loop_factory()


def test_serve_refuses_an_unknown_loop_before_loading_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 with the variable named, and ModelHost never built (no model load attempted)."""
    from lmserve_core.settings import ServeSettings
    from lmserve_server import runner

    def no_host(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model host was built before the event loop was checked")

    monkeypatch.setenv(event_loop.ENV, "trio")
    monkeypatch.setattr(runner.ModelHost, "from_settings", no_host)
    assert runner.run(ServeSettings(model_name="m", model_id="some/model")) == 2
    assert "LMSERVE_EVENT_LOOP='trio'" in capsys.readouterr().err
