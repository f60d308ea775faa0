"""IncrementalDetokenizer and StopStringMatcher with fake tokenizers (no torch).

Two fakes: a byte-level tokenizer (one token per UTF-8 byte, decode with
``errors="replace"`` like a real byte-level BPE), and a SentencePiece-like word
tokenizer whose decode drops the leading space of the first piece, as Llama's does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from lmserve_core.generation.detokenizer import IncrementalDetokenizer
from lmserve_core.generation.stop import StopStringMatcher

REPLACEMENT = "\ufffd"
BOS, EOS = 256, 257


class ByteTokenizer:
    """Just the slice of GenerationTokenizer the detokenizer uses."""

    def __init__(self) -> None:
        self.decode_calls = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        self.decode_calls += 1
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append({BOS: "<s>", EOS: "</s>"}[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


SP_VOCAB = ["<s>", "▁The", "▁cat", "▁sat", "▁down", ".", "▁on", "▁the", "▁mat", "ting"]


class SentencePieceLikeTokenizer:
    def decode(
        self,
        ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        pieces = [SP_VOCAB[i] for i in ids if not (skip_special_tokens and i == 0)]
        text = "".join(pieces).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def run_detok(
    tok: ByteTokenizer | SentencePieceLikeTokenizer,
    ids: Sequence[int],
    prompt_ids: list[int] | None = None,
) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)  # type: ignore[arg-type]
    outs = [detok.add(i) for i in ids]
    return outs, detok.flush()


# --- IncrementalDetokenizer -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "héllo wörld",
        "price: 5€ or 7€€€",
        "𝄞 music 𝄞𝄞",
        "日本語のテキスト",
        "a\u0301e\u0301",
    ],
)
def test_detokenizer_never_emits_replacement_mid_stream(text: str) -> None:
    tok = ByteTokenizer()
    outs, tail = run_detok(tok, tok.encode(text))
    assert all(REPLACEMENT not in o for o in outs), outs
    assert "".join(outs) + tail == text
    assert tail == ""  # everything complete was emitted by add()


def test_detokenizer_holds_a_multibyte_character_until_complete() -> None:
    tok = ByteTokenizer()
    outs, _ = run_detok(tok, tok.encode("a€b"))
    # "€" is 3 bytes: nothing for the first two, the whole character on the third.
    assert outs == ["a", "", "", "€", "b"]


def test_detokenizer_emits_each_character_once_and_whole() -> None:
    tok = ByteTokenizer()
    text = "é€𝄞x"
    outs, _ = run_detok(tok, tok.encode(text))
    assert [o for o in outs if o] == list(text)


def test_detokenizer_long_text_with_window_trimming() -> None:
    # Far more tokens than the detokenizer's context window (which it trims as it goes).
    rng = random.Random(1234)
    alphabet = "ab €éü日𝄞 .,"
    text = "".join(rng.choice(alphabet) for _ in range(400))
    tok = ByteTokenizer()
    outs, tail = run_detok(tok, tok.encode(text))
    assert all(REPLACEMENT not in o for o in outs)
    assert "".join(outs) + tail == text


def test_detokenizer_decodes_a_bounded_window() -> None:
    # Each step decodes a short window, never the whole history (quadratic cost).
    class Counting(ByteTokenizer):
        longest = 0

        def decode(
            self,
            ids: Sequence[int],
            *,
            skip_special_tokens: bool = True,
            spaces_between_special_tokens: bool = True,
        ) -> str:
            self.longest = max(self.longest, len(ids))
            return super().decode(ids, skip_special_tokens=skip_special_tokens)

    tok = Counting()
    run_detok(tok, tok.encode("x€" * 300))
    assert 0 < tok.longest <= 16


def test_detokenizer_flush_releases_an_incomplete_tail() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("ok€")[:-1]  # the last byte of "€" never comes
    outs, tail = run_detok(tok, ids)
    assert "".join(outs) == "ok"
    assert tail == REPLACEMENT  # what a real byte-level decode makes of it
    detok = IncrementalDetokenizer(tok, None)  # type: ignore[arg-type]
    assert detok.flush() == ""  # nothing pending: nothing to flush


def test_detokenizer_flush_twice_returns_nothing_the_second_time() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None)  # type: ignore[arg-type]
    detok.add(0xE2)
    assert detok.flush() == REPLACEMENT
    assert detok.flush() == ""


def test_detokenizer_special_token_emits_nothing() -> None:
    tok = ByteTokenizer()
    outs, tail = run_detok(tok, [*tok.encode("ab"), EOS, *tok.encode("c")])
    assert "".join(outs) + tail == "abc"
    assert outs[2] == ""


@pytest.mark.parametrize("prompt_text", ["Prompt: €", "€€€a", "ü"])
def test_detokenizer_with_byte_level_prompt_context(prompt_text: str) -> None:
    # "€€€a": the prompt tail used as context starts inside a character.
    tok = ByteTokenizer()
    prompt = [BOS, *tok.encode(prompt_text)]
    outs, tail = run_detok(tok, tok.encode("é and 𝄞"), prompt_ids=prompt)
    assert all(REPLACEMENT not in o for o in outs)
    assert "".join(outs) + tail == "é and 𝄞"  # the prompt itself is never re-emitted


def test_detokenizer_prompt_context_keeps_the_first_leading_space() -> None:
    tok = SentencePieceLikeTokenizer()
    # Decoded alone, "▁sat" loses its space; after the prompt it must keep it.
    assert tok.decode([3]) == "sat"
    outs, tail = run_detok(tok, [3, 4, 5], prompt_ids=[0, 1, 2])
    assert outs == [" sat", " down", "."]
    assert tail == ""
    assert "".join(outs) == tok.decode([0, 1, 2, 3, 4, 5])[len(tok.decode([0, 1, 2])) :]


def test_detokenizer_without_prompt_matches_plain_decode() -> None:
    tok = SentencePieceLikeTokenizer()
    ids = [1, 2, 3, 6, 7, 8, 9, 5] * 5
    outs, tail = run_detok(tok, ids)
    assert "".join(outs) + tail == tok.decode(ids)


def test_detokenizer_long_prompt_only_uses_its_tail() -> None:
    tok = SentencePieceLikeTokenizer()
    prompt = [0] + [1, 2, 3, 6, 7, 8] * 20
    outs, _ = run_detok(tok, [9, 4], prompt_ids=prompt)
    assert outs == ["ting", " down"]


# --- StopStringMatcher ----------------------------------------------------------------


def feed_all(m: StopStringMatcher, chunks: Sequence[str]) -> list[str]:
    return [m.feed(c) for c in chunks]


def test_stop_without_stops_passes_everything_through() -> None:
    m = StopStringMatcher([])
    assert feed_all(m, ["a", "bc", "", "d"]) == ["a", "bc", "", "d"]
    assert not m.stopped
    assert m.flush() == ""


def test_stop_ignores_empty_stop_strings() -> None:
    m = StopStringMatcher(["", "X"])
    assert m.stops == ["X"]
    assert m.feed("abc") == "abc"


def test_stop_match_across_chunk_boundaries() -> None:
    m = StopStringMatcher(["STOP"])
    outs = feed_all(m, ["Hel", "lo ST", "OP and more"])
    assert outs == ["Hel", "lo ", ""]
    assert m.stopped
    assert "".join(outs) == "Hello "
    # After the stop nothing more comes out, not even from flush.
    assert m.feed("more text") == ""
    assert m.flush() == ""


def test_stop_text_before_the_stop_in_the_same_chunk_is_emitted() -> None:
    m = StopStringMatcher(["\n\n"])
    assert m.feed("one line\n\nsecond") == "one line"
    assert m.stopped


def test_stop_partial_prefix_is_held_then_released() -> None:
    m = StopStringMatcher(["END"])
    assert m.feed("the E") == "the "
    assert m.feed("N") == ""  # "EN" could still become "END"
    assert m.feed("x") == "ENx"  # it did not
    assert not m.stopped
    assert m.feed("tail") == "tail"


def test_stop_flush_releases_the_held_prefix() -> None:
    m = StopStringMatcher(["END"])
    assert m.feed("xEN") == "x"
    assert m.flush() == "EN"
    assert not m.stopped
    assert m.flush() == ""


def test_stop_only_holds_back_a_real_prefix() -> None:
    m = StopStringMatcher(["abcdef"])
    # "xyz" is no prefix of the stop string: nothing is held back.
    assert m.feed("xyz") == "xyz"
    assert m.feed("ab") == ""
    assert m.feed("cX") == "abcX"


def test_stop_several_strings_first_position_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.feed("hello world") == "hel"
    assert m.stopped


def test_stop_several_strings_each_can_stop() -> None:
    for stop, expected in [("<|end|>", "abc"), ("###", "abc ")]:
        m = StopStringMatcher(["<|end|>", "###"])
        text = "abc<|end|>" if stop == "<|end|>" else "abc ###"
        assert "".join(feed_all(m, list(text))) == expected
        assert m.stopped


def test_stop_overlapping_prefixes() -> None:
    m = StopStringMatcher(["aab"])
    assert feed_all(m, ["a", "a", "a", "b"]) == ["", "", "a", ""]
    assert m.stopped


def test_stop_multibyte_stop_string() -> None:
    m = StopStringMatcher(["€€"])
    assert feed_all(m, ["5€", "x€", "€ tail"]) == ["5", "€x", ""]
    assert m.stopped


def _reference(text: str, stops: list[str]) -> str | None:
    """Text before the stop that completes first (earliest start among ties); None: no stop."""
    first_end = min((text.find(s) + len(s) for s in stops if s in text), default=None)
    if first_end is None:
        return None
    return text[: min(i for i in (text[:first_end].find(s) for s in stops) if i >= 0)]


def _random_case(seed: int) -> tuple[random.Random, list[str], str]:
    rng = random.Random(seed)
    alphabet = "abAB€ \n"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3)]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    return rng, stops, text


@pytest.mark.parametrize("seed", range(60))
def test_stop_character_by_character_matches_reference(seed: int) -> None:
    _, stops, text = _random_case(seed)
    m = StopStringMatcher(stops)
    outs = []
    for c in text:
        outs.append(m.feed(c))
        if m.stopped:
            break
    got = "".join(outs) + m.flush()
    expected = _reference(text, stops)
    assert got == (text if expected is None else expected), (stops, text)
    assert m.stopped == (expected is not None)


@pytest.mark.parametrize("seed", range(60))
def test_stop_random_chunking_invariants(seed: int) -> None:
    rng, stops, text = _random_case(seed)
    chunks, pos = [], 0
    while pos < len(text):
        step = rng.randint(1, 6)
        chunks.append(text[pos : pos + step])
        pos += step
    m = StopStringMatcher(stops)
    outs = []
    for c in chunks:
        outs.append(m.feed(c))
        if m.stopped:
            break
    got = "".join(outs) + m.flush()
    assert text.startswith(got)
    if not any(s in text for s in stops):
        assert got == text and not m.stopped
    else:
        # Cut right before a stop string, which is never emitted.
        assert m.stopped
        assert any(text[len(got) :].startswith(s) for s in stops)
        assert not any(s in got for s in stops)
