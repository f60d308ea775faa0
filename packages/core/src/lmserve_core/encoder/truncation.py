"""A per-request token limit: vLLM's ``truncate_prompt_tokens`` and ``truncation_side``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lmserve_core.errors import InvalidInput
from lmserve_core.tokenizer import Encoding, TextTokenizer


@dataclass(frozen=True)
class Truncation:
    """Keep ``tokens`` tokens of each input (-1: the model's maximum).

    ``side`` None truncates as the tokenizer does (its own side; special tokens kept), as vLLM
    does then; ``"left"`` keeps the last tokens and ``"right"`` the first, cut from the whole
    tokenized input (special tokens included), as vLLM does when the side is named."""

    tokens: int
    side: Literal["left", "right"] | None = None

    def limit(self, max_length: int) -> int:
        if self.tokens < 0:
            return max_length
        if self.tokens > max_length:
            raise InvalidInput(
                f"truncate_prompt_tokens={self.tokens} cannot be greater than the model's "
                f"maximum input length {max_length}",
                param="truncate_prompt_tokens",
            )
        return self.tokens

    def apply(
        self, tokenizer: TextTokenizer, texts: Sequence[str], add_special: bool, max_length: int
    ) -> list[Encoding]:
        keep = self.limit(max_length)
        if self.side is None:
            return tokenizer.encode_batch(texts, add_special_tokens=add_special, max_length=keep)
        full = tokenizer.encode_batch(texts, add_special_tokens=add_special, max_length=None)
        return [self.cut(enc, keep) for enc in full]

    def cut(self, enc: Encoding, keep: int) -> Encoding:
        if len(enc) <= keep:
            return enc
        part = slice(len(enc) - keep, None) if self.side == "left" else slice(0, keep)
        return replace(
            enc,
            ids=enc.ids[part],
            type_ids=enc.type_ids[part],
            offsets=enc.offsets[part],
            special_tokens_mask=enc.special_tokens_mask[part],
            word_ids=enc.word_ids[part],
        )
