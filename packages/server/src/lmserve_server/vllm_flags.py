"""vLLM's OpenAI-server flags (``vllm serve``'s frontend group) on ``lmserve serve``.

A KServe manifest written for vLLM carries them. Those lmserve implements are its own flags
(``ServeSettings``, in both spellings): ``--chat-template``, ``--trust-request-chat-template``,
``--chat-template-content-format``, ``--response-role``, ``--return-tokens-as-token-ids``,
``--enable-prompt-tokens-details``, ``--enable-force-include-usage``,
``--enable-request-id-headers``, ``--enable-auto-tool-choice``, ``--tool-call-parser``,
``--tool-parser-plugin``, ``--tool-strict-level``, ``--exclude-tools-when-tool-choice-none``,
``--reasoning-parser``, ``--reasoning-parser-plugin``, ``--lora-modules``, ``--host``, ``--grpc-port``, ``--api-key``,
``--allowed-origins``. A few have another name here (``USE_INSTEAD``). Every other one is a
startup error that names it (exit 2): never accepted and ignored. ``tests/test_vllm_flags.py``
checks the tables against the vLLM installed with the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

USE_INSTEAD: dict[str, str] = {
    "--port": "--http_port",
    "--uvicorn-log-level": "--log_level",
    "--disable-uvicorn-access-log": "--log_requests false",
}

NOT_IMPLEMENTED: frozenset[str] = frozenset({
    # The Responses API's built-in tools; a reasoning token budget.
    "--tool-server", "--reasoning-config",
    # Request handling and logging.
    "--trust-request-mm-kwargs", "--default-chat-template-kwargs", "--max-log-len",
    "--enable-per-request-metrics", "--enable-server-load-tracking", "--sse-keep-alive-interval",
    "--enable-tokenizer-info-endpoint", "--enable-log-outputs", "--enable-log-deltas",
    "--log-error-stack", "--tokens-only", "--fingerprint-mode", "--fingerprint-value",
    "--cohere-is-reasoning-model", "--cohere-format", "--anthropic-disabled-thinking-effort",
    # vLLM's own scale-out and transport.
    "--enable-scale-out", "--data-parallel-supervisor-port", "--dp-supervisor-probe-interval-s",
    "--dp-supervisor-probe-timeout-s", "--dp-supervisor-probe-failure-threshold", "--uds",
    "--disable-access-log-for-endpoints", "--allow-credentials", "--allowed-methods",
    "--allowed-headers", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
    "--enable-ssl-refresh", "--ssl-cert-reqs", "--ssl-ciphers", "--root-path", "--middleware",
    "--disable-fastapi-docs", "--h11-max-incomplete-event-size", "--h11-max-header-count",
    "--enable-offline-docs", "--enable-flash-late-interaction",
})  # fmt: skip


def refusal(args: Sequence[str]) -> str | None:
    """The error for the first vLLM server flag in ``args`` that lmserve does not take, or None."""
    for arg in args:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag.startswith("--no-"):
            flag = "--" + flag[len("--no-") :]
        if flag in USE_INSTEAD:
            return f"{arg.split('=', 1)[0]} is vLLM's; lmserve's flag is {USE_INSTEAD[flag]}"
        if flag in NOT_IMPLEMENTED:
            return f"{arg.split('=', 1)[0]} is a vLLM server flag that lmserve does not implement"
    return None
