"""vLLM's OpenAI-server flags on ``lmserve serve``: each one of the vLLM installed with the tests
is an lmserve flag, points to lmserve's own, or is refused at startup naming it (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmserve_server import vllm_flags
from lmserve_server.cli import serve_parser


def _vllm_server_flags() -> list[str]:
    from vllm.entrypoints.launchers.cli_args import FrontendArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(add_help=False)
    FrontendArgs.add_cli_args(parser)
    return [a.option_strings[0] for a in parser._actions if a.option_strings]


def _lmserve_flags() -> set[str]:
    return {o for a in serve_parser()._actions for o in a.option_strings}


def test_every_vllm_server_flag_is_taken_pointed_or_refused() -> None:
    ours = _lmserve_flags()
    unaccounted = [
        f for f in _vllm_server_flags()
        if f not in ours and f not in vllm_flags.USE_INSTEAD and f not in vllm_flags.NOT_IMPLEMENTED
    ]  # fmt: skip
    assert unaccounted == []
    # Nothing is both implemented and refused.
    assert not (ours & vllm_flags.NOT_IMPLEMENTED) and not (ours & set(vllm_flags.USE_INSTEAD))


def test_the_frontend_flags_lmserve_implements() -> None:
    implemented = set(_vllm_server_flags()) & _lmserve_flags()
    assert {"--response-role", "--enable-force-include-usage", "--return-tokens-as-token-ids",
            "--enable-prompt-tokens-details", "--chat-template-content-format",
            "--enable-request-id-headers", "--chat-template",
            "--trust-request-chat-template", "--lora-modules"} <= implemented  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reasoning-config", "{}"], "--reasoning-config is a vLLM server flag that lmserve"),
        (["--tool-server", "demo"], "--tool-server is a vLLM server flag"),
        # The parser flags are lmserve's, checked as vllm serve checks them, before any load.
        (["--enable-auto-tool-choice"], "--enable_auto_tool_choice requires --tool_call_parser"),
        (["--tool-call-parser", "nosuch"], "--tool_call_parser 'nosuch' is not one of vLLM's"),
        (["--reasoning-parser=nosuch"], "--reasoning_parser 'nosuch' is not one of vLLM's"),
        (
            ["--tool-parser-plugin", "/no/such/plugin.py", "--tool-call-parser", "hermes"],
            "--tool_parser_plugin: no such file: /no/such/plugin.py",
        ),
        (["--port", "9000"], "--port is vLLM's; lmserve's flag is --http_port"),
        (["--ssl-keyfile", "k.pem"], "--ssl-keyfile is a vLLM server flag"),
    ],
)
def test_a_vllm_server_flag_lmserve_lacks_is_a_clear_startup_error(
    flags: list[str], message: str
) -> None:
    run = subprocess.run([sys.executable, "-m", "lmserve_server", *flags],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
