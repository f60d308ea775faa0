"""What a generative backend implements, and the tokenizer slice the OpenAI layer needs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from lmserve_core.generation.params import GenerationRequest, StructuredOutput, TokenEvent


class GenerationTokenizer(Protocol):
    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def chat_template(self) -> str | None: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...

    def is_special(self, token_id: int) -> bool: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template: str | None,
        extra: dict[str, Any] | None,
    ) -> str: ...


class GenerativeBackend(Protocol):
    """Streams tokens; the only shape. Non-streaming callers collect the stream."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def is_encoder_decoder(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Yield one event per token; the last one carries ``finish_reason``.

        Closing the iterator early (client gone, stop string) aborts the request.
        """
        ...

    def check_structured_output(self, spec: StructuredOutput) -> None:
        """Compile ``spec`` (or find it compiled) so that requests using it can run; raise
        InvalidInput naming the field when it does not compile. May take a while (the caller
        runs it in a worker thread, with a time limit)."""
        ...

    def check_health(self) -> None:
        """Raise BackendError when the backend can no longer serve."""
        ...

    def num_unfinished(self) -> int:
        """Sequences admitted or waiting and not yet finished (a metrics gauge)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
