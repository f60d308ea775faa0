"""The slice of a tokenizer that the encoder tasks need, as a protocol backends implement."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from lmserve_core.errors import InvalidInput


@dataclass(frozen=True)
class Encoding:
    """One tokenized text, unpadded."""

    ids: list[int]
    type_ids: list[int]
    # [start, end) character offsets in the input text; (0, 0) for special tokens.
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]
    # Index of the word each token belongs to; None for special tokens.
    word_ids: list[int | None]

    def __len__(self) -> int:
        return len(self.ids)


class TextTokenizer(Protocol):
    """What the encoder tasks need from a tokenizer (backends wrap their own in it)."""

    @property
    def pad_token_id(self) -> int: ...

    @property
    def mask_token_id(self) -> int | None: ...

    @property
    def mask_token(self) -> str | None: ...

    @property
    def padding_side(self) -> str: ...

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        """Tokenize; truncate to ``max_length`` tokens when it is not None."""
        ...

    def encode_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        add_special_tokens: bool,
        max_length: int | None,
    ) -> list[Encoding]:
        """Tokenize (query, document) pairs as one sequence each (the second segment's
        ``type_ids`` 1). Over ``max_length`` (when not None) the document is cut first; only a
        query too long on its own is cut too (``longest_first``)."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...

    def id_to_token(self, token_id: int) -> str: ...


@contextmanager
def refusing_invalid_text(texts: Iterable[str]) -> Iterator[None]:
    """Turn the TypeError a Rust tokenizer raises for text it cannot take (a lone UTF-16
    surrogate, which JSON's ``\\ud800`` escapes can carry) into a 400; the happy path costs
    nothing."""
    try:
        yield
    except TypeError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(
                    f"input {i} is not valid Unicode text (it contains a lone surrogate)",
                    param="input",
                ) from None
        raise
