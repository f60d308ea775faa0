"""The metrics hooks core and the backends call while serving, given at construction.

Core keeps no Prometheus objects: the server's ``Metrics`` implements this protocol and is
handed to the model host, which hands it to the services, the batcher and (through
``LoadRequest``) the backend it loads.
"""

from __future__ import annotations

from typing import Protocol


class GenerationObserver(Protocol):
    """What the OpenAI generation layer reports. ``model``: the served name the request ran
    under (a LoRA adapter's, or the base model's primary name); None is the base model."""

    def first_token(self, seconds: float, *, model: str | None = None) -> None: ...

    def queue_time(self, seconds: float, *, model: str | None = None) -> None: ...

    def inter_token(self, seconds: float, *, model: str | None = None) -> None: ...

    def tokens(self, prompt: int, generated: int, *, model: str | None = None) -> None: ...


class ServingObserver(GenerationObserver, Protocol):
    """Everything a served model reports: generation, encoder batches, decoding steps."""

    def batch(self, instances: int) -> None:
        """One encoder batch ran ``instances`` instances."""
        ...

    def forward_pass(self, seconds: float) -> None:
        """One encoder forward pass took ``seconds`` in the backend (the model, or a remote
        one's round trip); a batch may run as several length-sorted passes."""
        ...

    def decode_step(self, sequences: int) -> None:
        """One generation forward pass advanced ``sequences`` sequences."""
        ...
