"""Adapter from a transformers tokenizer to lmserve_core's GenerationTokenizer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class HFGenerationTokenizer:
    def __init__(
        self, tokenizer: Any, *, extra_eos: Iterable[int] = (), chat_template: str | None = None
    ) -> None:
        self._tok = tokenizer
        eos = set(extra_eos)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = frozenset(eos)
        self._template = chat_template or getattr(tokenizer, "chat_template", None) or None
        self._special = frozenset(int(i) for i in tokenizer.all_special_ids)

    @property
    def raw(self) -> Any:
        return self._tok

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def chat_template(self) -> str | None:
        return self._template if isinstance(self._template, str) else None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [int(t) for t in self._tok.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(ids))]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template: str | None,
        extra: dict[str, Any] | None,
    ) -> str:
        text = self._tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template or self._template,
            **(extra or {}),
        )
        return str(text)
