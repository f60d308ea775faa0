"""A model's ``tokenizer.json`` run by the ``tokenizers`` library alone, without transformers.

transformers 5 imports torch as soon as ``AutoTokenizer`` is touched (its configuration module
pulls in the generation utilities), so the Triton bridge, which must not import torch, reads
the serialised fast tokenizer directly. What transformers' fast tokenizer adds on top of
``tokenizer.json`` is reproduced here: the special tokens of ``tokenizer_config.json`` (and
``special_tokens_map.json``), truncation as ``truncation=True, max_length=L`` sets it, no
padding, and ``clean_up_tokenization_spaces`` on decode (never for BPE models, as there).
``tests/`` checks token-for-token parity with transformers on every test model.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmserve_core.errors import ConfigurationError
from lmserve_core.hf_adapters import encode_pairs_document_first, strip_lowercase
from lmserve_core.tokenizer import Encoding, refusing_invalid_text

__all__ = ["RustTokenizer", "load_rust_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"


class RustTokenizer:
    """lmserve_core's ``TextTokenizer`` over a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Any, config: dict[str, Any]) -> None:
        self._config = config
        self._base = tokenizer
        self._base.no_padding()
        self._base.no_truncation()
        # enable_truncation() mutates the tokenizer and encode_batch runs on many threads:
        # one private copy per truncation length instead of a shared, re-configured one.
        self._truncating: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()
        self._truncation_side = str(config.get("truncation_side") or "right")
        pad = self._special_id("pad_token")
        if pad is None:
            eos = self._special_id("eos_token")
            pad = eos if eos is not None else 0
        self._pad_id = pad
        self._mask_token = _token_text(config.get("mask_token"))
        self._mask_id = self._special_id("mask_token")
        bpe = json.loads(tokenizer.to_str()).get("model", {}).get("type") == "BPE"
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and not bpe
        self.model_max_length: int | None = config.get("model_max_length")

    def _special_id(self, key: str) -> int | None:
        text = _token_text(self._config.get(key))
        if text is None:
            return None
        token_id = self._base.token_to_id(text)
        return None if token_id is None else int(token_id)

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    @property
    def mask_token_id(self) -> int | None:
        return self._mask_id

    @property
    def mask_token(self) -> str | None:
        return self._mask_token

    @property
    def padding_side(self) -> str:
        return str(self._config.get("padding_side") or "right")

    def _for_length(self, max_length: int | None, strategy: str = "longest_first") -> Any:
        if max_length is None:
            return self._base
        with self._lock:
            tok = self._truncating.get((max_length, strategy))
            if tok is None:
                tok = type(self._base).from_str(self._base.to_str())
                tok.no_padding()
                tok.enable_truncation(
                    max_length, stride=0, strategy=strategy, direction=self._truncation_side
                )
                self._truncating[(max_length, strategy)] = tok
            return tok

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        with refusing_invalid_text(texts):
            return self._encode_batch(texts, add_special_tokens, max_length)

    def _encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        tokenizer = self._for_length(max_length)
        if len(texts) == 1:
            # encode_batch hands even one text to its rayon thread pool, whose spinning
            # workers then compete with the event loop and the model for the cores.
            encoded = [tokenizer.encode(texts[0], add_special_tokens=add_special_tokens)]
        else:
            encoded = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [_encoding(e) for e in encoded]

    def encode_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        add_special_tokens: bool,
        max_length: int | None,
    ) -> list[Encoding]:
        def encode(chunk: Sequence[tuple[str, str]], strategy: str) -> list[Encoding]:
            tokenizer = self._for_length(max_length, strategy)
            if len(chunk) == 1:  # no rayon pool for one pair (see encode_batch)
                q, d = chunk[0]
                return [_encoding(tokenizer.encode(q, d, add_special_tokens=add_special_tokens))]
            encoded = tokenizer.encode_batch(list(chunk), add_special_tokens=add_special_tokens)
            return [_encoding(e) for e in encoded]

        with refusing_invalid_text([text for pair in pairs for text in pair]):
            return encode_pairs_document_first(pairs, encode)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        text = str(self._base.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return clean_up_tokenization(text) if self._clean_up else text

    def id_to_token(self, token_id: int) -> str:
        return str(self._base.id_to_token(int(token_id)))

    @functools.cached_property
    def max_token_id(self) -> int:
        """The largest id with a token (added tokens included): ids above are out of vocabulary."""
        vocab = self._base.get_vocab(with_added_tokens=True)
        return max((int(i) for i in vocab.values()), default=-1)


def _encoding(e: Any) -> Encoding:
    # Each getter builds a fresh Python list (of ints, of (int, int) tuples for offsets):
    # taken as they are, converting the offsets again cost two thirds of this function.
    return Encoding(
        ids=e.ids,
        type_ids=e.type_ids,
        offsets=e.offsets,
        special_tokens_mask=e.special_tokens_mask,
        word_ids=e.word_ids,
    )


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and clitics."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def has_rust_tokenizer(model_dir: Path) -> bool:
    return (model_dir / TOKENIZER_FILE).is_file()


def load_rust_tokenizer(model_dir: Path, *, disable_lower_case: bool) -> RustTokenizer:
    from tokenizers import Tokenizer

    path = model_dir / TOKENIZER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if disable_lower_case:
            strip_lowercase(data)
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # a missing, unreadable or malformed file
        raise ConfigurationError(f"cannot load {path}: {exc}", param="model_dir") from exc
    config: dict[str, Any] = {}
    # special_tokens_map.json first: tokenizer_config.json has the last word, as in transformers.
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = model_dir / name
        if file.is_file():
            try:
                loaded = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ConfigurationError(f"cannot read {file}: {exc}", param="model_dir") from exc
            if isinstance(loaded, dict):
                config.update(loaded)
    return RustTokenizer(tokenizer, config)
