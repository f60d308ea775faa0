"""Incremental detokenization that never splits a multi-byte character.

Decoding one token at a time loses SentencePiece spaces and splits UTF-8 sequences, so
each step decodes a short window of context (as vLLM does) and emits only the new,
complete text.
"""

from __future__ import annotations

from lmserve_core.generation.backend import GenerationTokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT = 6  # tokens of context decoded before the new ones


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: GenerationTokenizer,
        prompt_ids: list[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        # Seed with the prompt's tail so the first token's leading space decodes right.
        self._ids: list[int] = list(prompt_ids[-_CONTEXT:]) if prompt_ids else []
        self._prefix = 0  # start of the context window (the prompt tail is context)
        self._read = len(self._ids)  # end of the window already emitted

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            # An incomplete UTF-8 sequence: wait for the next token.
            return ""
        new = full_text[len(prefix_text) :]
        self._prefix = max(self._read, len(self._ids) - _CONTEXT)
        self._read = len(self._ids)
        # Keep the window bounded.
        if self._prefix > 4 * _CONTEXT:
            drop = self._prefix - _CONTEXT
            self._ids = self._ids[drop:]
            self._prefix -= drop
            self._read -= drop
        return new

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(
            ids,
            skip_special_tokens=self._skip,
            spaces_between_special_tokens=self._spaces,
        )
