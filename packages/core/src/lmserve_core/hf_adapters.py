"""Adapters from transformers tokenizers to lmserve_core's tokenizer protocols.

Duck-typed: they wrap any object with the transformers tokenizer API and import neither
transformers nor tokenizers, so every backend (and the Triton bridge) shares them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lmserve_core.tokenizer import Encoding, refusing_invalid_text

logger = logging.getLogger(__name__)


class HFTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        if tokenizer.pad_token_id is None:
            # Same fallback as KServe: encoders need some padding id; padded positions
            # are masked out, so which token it is does not change results.
            fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            logger.warning("tokenizer has no pad token; padding with id %d", fallback)
            self._pad_id = int(fallback)
        else:
            self._pad_id = int(tokenizer.pad_token_id)

    @property
    def raw(self) -> Any:
        return self._tok

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def mask_token_id(self) -> int | None:
        value = self._tok.mask_token_id
        return None if value is None else int(value)

    @property
    def mask_token(self) -> str | None:
        value = self._tok.mask_token
        return None if value is None else str(value)

    @property
    def padding_side(self) -> str:
        return str(getattr(self._tok, "padding_side", "right"))

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        return self._encode(
            list(texts), None, add_special_tokens=add_special_tokens,
            truncation=max_length is not None, max_length=max_length,
        )  # fmt: skip

    def encode_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        add_special_tokens: bool,
        max_length: int | None,
    ) -> list[Encoding]:
        def encode(chunk: Sequence[tuple[str, str]], truncation: Any) -> list[Encoding]:
            return self._encode(
                [q for q, _ in chunk], [d for _, d in chunk],
                add_special_tokens=add_special_tokens,
                truncation=truncation if max_length is not None else False,
                max_length=max_length,
            )  # fmt: skip

        return encode_pairs_document_first(pairs, encode)

    def _encode(
        self,
        texts: list[str],
        pairs: list[str] | None,
        *,
        add_special_tokens: bool,
        truncation: Any,
        max_length: int | None,
    ) -> list[Encoding]:
        with refusing_invalid_text([*texts, *(pairs or [])]):
            enc = self._call(texts, pairs, add_special_tokens, truncation, max_length)
        return self._encodings(enc, len(texts))

    def _call(
        self,
        texts: list[str],
        pairs: list[str] | None,
        add_special_tokens: bool,
        truncation: Any,
        max_length: int | None,
    ) -> Any:
        return self._tok(
            texts,
            pairs,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
            padding=False,
            return_token_type_ids=True,
            return_attention_mask=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )

    @staticmethod
    def _encodings(enc: Any, count: int) -> list[Encoding]:
        out = []
        for i in range(count):
            ids = [int(t) for t in enc["input_ids"][i]]
            types = enc.get("token_type_ids")
            out.append(
                Encoding(
                    ids=ids,
                    type_ids=list(types[i]) if types is not None else [0] * len(ids),
                    offsets=[(int(a), int(b)) for a, b in enc["offset_mapping"][i]],
                    special_tokens_mask=list(enc["special_tokens_mask"][i]),
                    word_ids=enc.word_ids(i),
                )
            )
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        return str(self._tok.convert_ids_to_tokens(int(token_id)))

    @functools.cached_property
    def max_token_id(self) -> int:
        """The largest id with a token (added tokens included): ids above are out of vocabulary."""
        return _max_token_id(self._tok)


def encode_pairs_document_first(
    pairs: Sequence[tuple[str, str]],
    encode: Callable[[Sequence[tuple[str, str]], str], list[Encoding]],
) -> list[Encoding]:
    """Pairs truncated document first (``only_second``); a pair whose query alone is too long
    for that (the tokenizer raises) is cut on both sides instead (``longest_first``).

    ``encode(pairs, strategy)`` tokenizes with a truncation strategy (a no-op when the caller
    does not truncate at all)."""
    try:
        return encode(pairs, "only_second")
    except Exception:
        out = []
        for pair in pairs:
            try:
                out.extend(encode([pair], "only_second"))
            except Exception:
                out.extend(encode([pair], "longest_first"))
        return out


class HFGenerationTokenizer:
    def __init__(
        self, tokenizer: Any, *, extra_eos: Iterable[int] = (), chat_template: str | None = None
    ) -> None:
        self._tok = tokenizer
        eos = set(extra_eos)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos = frozenset(eos)
        self._primary_eos = None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
        self._template = chat_template or getattr(tokenizer, "chat_template", None) or None
        self._special = frozenset(int(i) for i in tokenizer.all_special_ids)

    @property
    def raw(self) -> Any:
        return self._tok

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's EOS and the generation config's extra EOS ids."""
        return self._eos

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS: the one that ends a sequence with no ``stop_reason``."""
        return self._primary_eos

    @property
    def chat_template(self) -> str | None:
        return self._template if isinstance(self._template, str) else None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        with refusing_invalid_text([text]):
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return [int(t) for t in ids]

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        # transformers applies spaces_between_special_tokens where the tokenizer has the
        # notion (slow tokenizers); fast ones decode the same either way, as in vLLM.
        return str(
            self._tok.decode(
                list(ids),
                skip_special_tokens=skip_special_tokens,
                spaces_between_special_tokens=spaces_between_special_tokens,
            )
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(ids))]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    @functools.cached_property
    def max_token_id(self) -> int:
        """The largest id with a token (added tokens included): ids above are out of vocabulary."""
        return _max_token_id(self._tok)

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


def _max_token_id(tok: Any) -> int:
    # vLLM's bound for a token id (its tokenizer's max_token_id), read once: get_vocab builds a
    # dict of the whole vocabulary.
    return max((int(i) for i in tok.get_vocab().values()), default=-1)


def disable_lower_case(tok: Any) -> None:
    """Turn lower-casing off in the Rust normalizer.

    transformers' ``do_lower_case`` kwarg does not rebuild an already serialised fast
    tokenizer, so we edit its JSON: BertNormalizer(lowercase) and Lowercase steps.
    """
    backend = tok.backend_tokenizer
    data = json.loads(backend.to_str())
    if not strip_lowercase(data):
        return
    # type(backend) is tokenizers.Tokenizer: no import of the library needed here.
    tok._tokenizer = type(backend).from_str(json.dumps(data))
    if hasattr(tok, "do_lower_case"):
        tok.do_lower_case = False


def strip_lowercase(tokenizer_json: dict[str, Any]) -> bool:
    """Remove lower-casing from a parsed ``tokenizer.json`` in place; True if it had any."""
    normalizer = tokenizer_json.get("normalizer")
    if normalizer is None:
        return False
    if normalizer.get("type") == "Lowercase":
        tokenizer_json["normalizer"] = None
        return True
    return _strip_lowercase(normalizer)


def _strip_lowercase(node: dict[str, Any]) -> bool:
    changed = False
    if node.get("type") == "BertNormalizer" and node.get("lowercase"):
        node["lowercase"] = False
        changed = True
    if node.get("type") == "Sequence":
        kept = [n for n in node.get("normalizers", []) if n.get("type") != "Lowercase"]
        changed |= len(kept) != len(node.get("normalizers", []))
        node["normalizers"] = kept
        for child in kept:
            changed |= _strip_lowercase(child)
    return changed
