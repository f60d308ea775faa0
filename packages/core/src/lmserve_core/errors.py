"""The one error tree of lmserve. No HTTP or gRPC codes here: the server maps them.

LmserveError
├── InvalidInput          the request is malformed or asks for something impossible
│   └── InputTooLong      more tokens than the model accepts (with truncation off)
├── ModelNotFound         no model of that name is served
├── Conflict              the request clashes with the server's state (an adapter still busy)
├── ModelNotReady         the model is loading, failed, or the server is draining
├── ClientDisconnected    the client left before its answer was ready
├── Overloaded            the queue is full; retry later
├── BackendError          the model itself failed while serving a valid request
│   └── PredictorError    the remote predictor (Triton) failed or could not be reached
└── ConfigurationError    startup settings are wrong (names the flag)
"""

from __future__ import annotations


class LmserveError(Exception):
    """Base of every error lmserve raises on purpose."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The request field (or CLI flag) at fault, when one is.
        self.param = param


class InvalidInput(LmserveError):
    """The client sent something the model cannot serve."""


class InputTooLong(InvalidInput):
    """An input exceeds the model's maximum length and truncation was refused."""


class ModelNotFound(LmserveError):
    """No model of the requested name is served here."""


class Conflict(LmserveError):
    """The request is valid but clashes with what the server is doing now (unloading a LoRA
    adapter that requests still use when the wait runs out): retrying later can succeed."""


class ModelNotReady(LmserveError):
    """The model exists but cannot serve now (loading, unhealthy, shutting down)."""


class ClientDisconnected(LmserveError):
    """The client closed its connection; the work for it was abandoned (not a server fault)."""


class Overloaded(LmserveError):
    """Too many requests are queued; the client should retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendError(LmserveError):
    """The backend failed on a valid request (a bug or a dead engine, not the client)."""


class PredictorError(BackendError):
    """The remote predictor of transformer mode (a Triton server) answered with an error or
    could not be reached; ``message`` carries the predictor's own words."""


class ConfigurationError(LmserveError):
    """Invalid startup configuration; ``param`` names the flag to fix."""
