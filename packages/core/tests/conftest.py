"""Small fakes for the core tests: a whitespace/word-piece tokenizer and a numpy backend.

Tests reach them through fixtures (``--import-mode=importlib`` makes conftest modules
unimportable by name).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from lmserve_core.encoder import EncoderOptions, EncoderResult, EncoderService, ModelInfo
from lmserve_core.observer import ServingObserver
from lmserve_core.tasks import Task
from lmserve_core.tokenizer import Encoding

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "cat", "sat", "on", "mat", "john", "##son", "lives", "in", "new",
    "york", "paris", "a", "dog", ".",
]  # fmt: skip
SPECIAL_IDS = {PAD, UNK, CLS, SEP, MASK} - {UNK}


class FakeTokenizer:
    """Implements ``lmserve_core.tokenizer.TextTokenizer`` over :data:`VOCAB`.

    Words are whitespace separated; a word not in the vocabulary is split greedily into
    a known prefix and ``##`` continuations (word-piece style), else it is ``[UNK]``.
    Offsets are ``[start, end)`` character positions in the input text.
    """

    def __init__(self) -> None:
        self.vocab = {token: i for i, token in enumerate(VOCAB)}
        self.calls: list[dict[str, Any]] = []

    @property
    def pad_token_id(self) -> int:
        return PAD

    @property
    def mask_token_id(self) -> int | None:
        return MASK

    @property
    def mask_token(self) -> str | None:
        return "[MASK]"

    @property
    def padding_side(self) -> str:
        return "right"

    def _word_pieces(self, word: str, start: int) -> list[tuple[int, int, int]]:
        if word in self.vocab:
            return [(self.vocab[word], start, start + len(word))]
        pieces, pos = [], 0
        while pos < len(word):
            for end in range(len(word), pos, -1):
                piece = word[pos:end] if pos == 0 else "##" + word[pos:end]
                if piece in self.vocab:
                    pieces.append((self.vocab[piece], start + pos, start + end))
                    pos = end
                    break
            else:
                return [(UNK, start, start + len(word))]
        return pieces

    def encode_one(
        self, text: str, *, add_special_tokens: bool, max_length: int | None
    ) -> Encoding:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        word_ids: list[int | None] = []
        for w, match in enumerate(re.finditer(r"\S+", text)):
            for token, start, end in self._word_pieces(match.group(), match.start()):
                ids.append(token)
                offsets.append((start, end))
                word_ids.append(w)
        special = [0] * len(ids)
        if max_length is not None:
            keep = max_length - 2 if add_special_tokens else max_length
            ids, offsets, word_ids, special = (
                ids[:keep], offsets[:keep], word_ids[:keep], special[:keep]
            )  # fmt: skip
        if add_special_tokens:
            ids = [CLS, *ids, SEP]
            offsets = [(0, 0), *offsets, (0, 0)]
            word_ids = [None, *word_ids, None]
            special = [1, *special, 1]
        return Encoding(ids, [0] * len(ids), offsets, special, word_ids)

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> list[Encoding]:
        self.calls.append({"texts": list(texts), "add_special_tokens": add_special_tokens,
                           "max_length": max_length})  # fmt: skip
        return [
            self.encode_one(t, add_special_tokens=add_special_tokens, max_length=max_length)
            for t in texts
        ]

    def encode_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        add_special_tokens: bool,
        max_length: int | None,
    ) -> list[Encoding]:
        """[CLS] query [SEP] document [SEP] (the document's type id 1), the document cut first
        over ``max_length``."""
        self.calls.append({"pairs": list(pairs), "add_special_tokens": add_special_tokens,
                           "max_length": max_length})  # fmt: skip
        out = []
        for query, document in pairs:
            q = self.encode_one(query, add_special_tokens=False, max_length=None)
            d = self.encode_one(document, add_special_tokens=False, max_length=None)
            specials = 3 if add_special_tokens else 0
            keep = len(d) if max_length is None else max(0, max_length - specials - len(q))
            ids = [*q.ids, *d.ids[:keep]]
            types = [0] * len(q) + [1] * len(d.ids[:keep])
            if add_special_tokens:
                ids = [CLS, *q.ids, SEP, *d.ids[:keep], SEP]
                types = [0] * (len(q) + 2) + [1] * (len(d.ids[:keep]) + 1)
            n = len(ids)
            out.append(Encoding(ids, types, [(0, 0)] * n, [0] * n, [None] * n))
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out = ""
        for token_id in ids:
            if skip_special_tokens and token_id in SPECIAL_IDS:
                continue
            token = VOCAB[token_id]
            if token.startswith("##"):
                out += token[2:]
            else:
                out += (" " if out else "") + token
        return out

    def id_to_token(self, token_id: int) -> str:
        return VOCAB[token_id]


class FakeBackend:
    """An ``EncoderBackend`` that returns ``fn(input_ids, attention_mask)``.

    Records every call's inputs and thread. With ``block_first=True`` the first forward
    waits for ``release`` (a threading.Event) after setting ``started``.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        *,
        block_first: bool = False,
    ) -> None:
        self.fn = fn
        self.calls: list[dict[str, np.ndarray]] = []
        self.threads: list[int] = []
        self.closed = False
        self.block_first = block_first
        self.started = threading.Event()
        self.release = threading.Event()

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        self.calls.append({k: np.array(v) for k, v in inputs.items()})
        self.threads.append(threading.get_ident())
        if self.block_first and len(self.calls) == 1:
            self.started.set()
            if not self.release.wait(30):
                raise RuntimeError("test never released the first forward pass")
        return np.asarray(self.fn(inputs["input_ids"], inputs["attention_mask"]), dtype=np.float32)

    def close(self) -> None:
        self.closed = True

    def check_health(self) -> None:
        pass


@pytest.fixture
def tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture
def fake_backend() -> type[FakeBackend]:
    return FakeBackend


@pytest.fixture
def vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate(VOCAB)}


@pytest.fixture
def make_service(tokenizer: FakeTokenizer) -> Callable[..., tuple[EncoderService, FakeBackend]]:
    """``make_service(task, fn, info=..., options=...) -> (service, backend)``."""

    def make(
        task: Task,
        fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        *,
        info: ModelInfo | None = None,
        options: EncoderOptions | None = None,
        block_first: bool = False,
        max_batch_size: int = 32,
        bucket_lengths: bool = False,
        chunk_rows: int | None = None,
        max_batch_tokens: int | None = None,
        observer: ServingObserver | None = None,
    ) -> tuple[EncoderService, FakeBackend]:
        backend = FakeBackend(fn, block_first=block_first)
        service = EncoderService(
            task=task,
            tokenizer=tokenizer,
            backend=backend,
            info=info or ModelInfo(),
            options=options or EncoderOptions(),
            max_batch_size=max_batch_size,
            bucket_lengths=bucket_lengths,
            chunk_rows=chunk_rows,
            max_batch_tokens=max_batch_tokens,
            observer=observer,
        )
        return service, backend

    return make


def _infer_all(
    service: EncoderService, requests: Sequence[tuple[Any, Mapping[str, Any] | None]]
) -> list[EncoderResult]:
    async def main() -> list[EncoderResult]:
        await service.start()
        try:
            return [await service.infer(texts, params) for texts, params in requests]
        finally:
            await service.stop()

    return asyncio.run(main())


@pytest.fixture
def infer() -> Callable[..., EncoderResult]:
    """``infer(service, texts, parameters=None)``: start, one request, stop."""

    def run(
        service: EncoderService, texts: Any, parameters: Mapping[str, Any] | None = None
    ) -> EncoderResult:
        return _infer_all(service, [(texts, parameters)])[0]

    return run
