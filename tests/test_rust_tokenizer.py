"""The Triton bridge's tokenizer (``tokenizers`` alone, no transformers and no torch) must
tokenize, decode and name special tokens exactly as transformers' fast tokenizer does."""

from __future__ import annotations

import pytest

from _support.tiny_models import model_path
from lmserve_backend_hf.rust_tokenizer import load_rust_tokenizer
from lmserve_backend_hf.tokenizer import load_tokenizer
from lmserve_core.builtin_models import locate_builtin

TEXTS = [
    "Hello, World! isn't it?",
    "Alice lives in Paris and works at Google.",
    "The capital of France is [MASK].",
    "héllo ÜBER straße 東京 🙂",
    "a " * 300,
    "",
    "  spaced   out  ",
]
# BERT WordPiece (cased and uncased), GPT-2 and Llama byte-level BPE, T5 unigram.
MODELS = ["sentiment", "ner", "masked_lm", "embedding_cls", "gpt2", "llama", "t5"]


@pytest.mark.parametrize("disable_lower_case", [False, True], ids=["default", "no-lowercase"])
@pytest.mark.parametrize("name", [*MODELS, "all-minilm-l6-v2"])
def test_same_tokens_as_transformers(name: str, disable_lower_case: bool) -> None:
    path = locate_builtin(name) if name == "all-minilm-l6-v2" else model_path(name)
    rust = load_rust_tokenizer(path, disable_lower_case=disable_lower_case)
    hf = load_tokenizer(
        str(path), revision=None, trust_remote_code=False, disable_lower_case=disable_lower_case
    )
    for max_length in (None, 16):
        for special in (True, False):
            got = rust.encode_batch(TEXTS, add_special_tokens=special, max_length=max_length)
            want = hf.encode_batch(TEXTS, add_special_tokens=special, max_length=max_length)
            assert got == want, (max_length, special)
    assert (rust.pad_token_id, rust.mask_token_id, rust.mask_token, rust.padding_side) == (
        hf.pad_token_id, hf.mask_token_id, hf.mask_token, hf.padding_side,
    )  # fmt: skip
    assert rust.model_max_length == hf.raw.model_max_length
    ids = [i for e in hf.encode_batch(TEXTS[:3], add_special_tokens=True, max_length=None)
           for i in e.ids]  # fmt: skip
    for skip in (True, False):
        assert rust.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    assert [rust.id_to_token(i) for i in ids] == [hf.id_to_token(i) for i in ids]


def test_truncation_lengths_do_not_leak_between_calls() -> None:
    rust = load_rust_tokenizer(model_path("sentiment"), disable_lower_case=False)
    long = ["I love this " * 40]
    assert len(rust.encode_batch(long, add_special_tokens=True, max_length=8)[0]) == 8
    assert len(rust.encode_batch(long, add_special_tokens=True, max_length=None)[0]) > 100
    assert len(rust.encode_batch(long, add_special_tokens=True, max_length=12)[0]) == 12
