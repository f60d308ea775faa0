"""Structured outputs (constrained decoding) on the transformers engine, with xgrammar.

Each kind of :class:`StructuredOutput` maps to xgrammar as vLLM's xgrammar backend maps it
(``vllm/v1/structured_output/backend_xgrammar.py``): ``json`` and ``json_object`` to
``compile_json_schema`` (strict: properties the schema does not name are not generated, so
``disable_additional_properties`` is already the behaviour; ``disable_any_whitespace`` drops
the optional whitespace and uses ``(",", ":")`` separators; ``whitespace_pattern`` has no
xgrammar equivalent and is ignored, as vLLM's xgrammar backend ignores it), ``regex`` to
``compile_regex``, ``choice`` to an EBNF grammar of the alternatives, ``grammar`` to
``compile_grammar`` (EBNF/GBNF) or ``compile_lark`` (when no rule uses ``::=``), and
``structural_tag`` to ``compile_structural_tag`` (the legacy ``structures``/``triggers`` form
too).

:class:`GrammarCache` compiles once per spec (a bounded LRU; thread-safe, and a spec being
compiled by one thread is waited for, not compiled again, by another).
:class:`RowGrammar` is one sequence's matcher. :class:`GrammarBitmask` is the batch's
token bitmask, allocated once and applied in place to the rows that have a grammar.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import xgrammar as xgr

from lmserve_core.errors import InvalidInput
from lmserve_core.generation.params import StructuredOutput

if TYPE_CHECKING:
    import torch

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the client needs the rest.
_CPP_PREFIX = re.compile(r"^\s*(\[\d\d:\d\d:\d\d\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")

_WHAT = {
    "json": "the JSON schema",
    "json_object": "the JSON object grammar",
    "regex": "the regular expression",
    "choice": "the choice list",
    "grammar": "the grammar",
    "structural_tag": "the structural tag",
}


def xgrammar_reason(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location (first line only)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [_CPP_PREFIX.sub("", line).strip() for line in text.splitlines()]
    return next((line for line in lines if line), type(exc).__name__)


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices`` (vLLM's ``choice_as_grammar``)."""

    def literal(text: str) -> str:
        out = []
        for ch in text:
            if ch in '\\"':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\r":
                out.append("\\r")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


def grammar_is_lark(grammar: str) -> bool:
    """True unless some rule is written ``name ::= ...`` (EBNF/GBNF), as vLLM decides."""
    for line in grammar.splitlines():
        line = re.sub(r"(#|//).*$", "", line).strip()
        if "::=" in line:
            return False
    return True


# vLLM's limits: compiling gets steeply slower with nesting (3000 levels of arrays take
# minutes), so deeper JSON schemas and structural tags are refused before xgrammar sees them.
MAX_JSON_NESTING = 64
STRUCTURAL_TAG_EXTRA_NESTING = 16


def _load_json(text: str, what: str, limit: int) -> Any:
    """``text`` parsed; InvalidInput when it is not JSON or nests objects/arrays deeper than
    ``limit``."""
    too_deep = InvalidInput(
        f"{what} is nested too deeply: objects and arrays may nest at most "
        f"{MAX_JSON_NESTING} levels"
    )
    try:
        doc = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc
    level = [doc] if isinstance(doc, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise too_deep
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
    return doc


def _cache_key(spec: StructuredOutput) -> tuple[str, str, bool]:
    # Only what changes the compiled grammar (whitespace_pattern and
    # disable_additional_properties do not, see the module docstring).
    compact = spec.disable_any_whitespace and spec.kind in ("json", "json_object")
    return spec.kind, spec.value, compact


class GrammarCache:
    """One model's xgrammar compiler and its compiled grammars, by spec (LRU, bounded).

    ``tokenizer`` is the transformers tokenizer; ``vocab_size`` the width of the model's
    logits (the bitmask covers it, padding rows included). The compiler is built on first
    use: reading a large vocabulary takes a moment, and most servers never constrain.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        stop_token_ids: Iterable[int] = (),
        max_entries: int = 128,
        max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(t for t in stop_token_ids if 0 <= t < vocab_size)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._compiler_lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, bool], xgr.CompiledGrammar] = OrderedDict()
        self._bytes = 0
        self._pending: dict[tuple[str, str, bool], Future[xgr.CompiledGrammar]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_ids or None,
                )
                # Our LRU is the cache: xgrammar's own would hold every grammar a second time.
                threads = max(1, min(8, os.cpu_count() or 1))
                self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
            return self._compiler

    def get(self, spec: StructuredOutput) -> xgr.CompiledGrammar | None:
        """The compiled grammar of ``spec`` if it is cached (never compiles)."""
        with self._lock:
            return self._cached(_cache_key(spec))

    def _cached(self, key: tuple[str, str, bool]) -> xgr.CompiledGrammar | None:
        """The cached entry, marked recently used (the caller holds the lock)."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec`` (the same object while it stays cached); raises
        InvalidInput with xgrammar's reason when it does not compile."""
        key = _cache_key(spec)
        with self._lock:
            hit = self._cached(key)
            if hit is not None:
                return hit
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()  # another thread compiles it; its error is ours too
        try:
            compiled = self._compile(spec)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._entries[key] = compiled
            self._bytes += compiled.memory_size_bytes
            while len(self._entries) > 1 and (
                len(self._entries) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.memory_size_bytes
        pending.set_result(compiled)
        return compiled

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        what = _WHAT.get(spec.kind)
        if what is None:
            raise InvalidInput(f"unknown structured output kind {spec.kind!r}")
        compiler = self.compiler
        try:
            return self._compile_kind(compiler, spec)
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(f"{what} does not compile: {xgrammar_reason(exc)}") from exc

    @staticmethod
    def _compile_kind(compiler: xgr.GrammarCompiler, spec: StructuredOutput) -> xgr.CompiledGrammar:
        kind, value = spec.kind, spec.value
        if kind in ("json", "json_object"):
            schema = value if kind == "json" else '{"type": "object"}'
            if kind == "json":
                _load_json(schema, "the JSON schema", MAX_JSON_NESTING)
            compact = spec.disable_any_whitespace
            return compiler.compile_json_schema(
                schema,
                any_whitespace=not compact,
                separators=(",", ":") if compact else None,
                strict_mode=True,
            )
        if kind == "regex":
            if "\x00" in value:  # xgrammar's regex parser does not handle NUL (vLLM refuses it)
                raise InvalidInput("the regular expression must not contain a NUL character")
            return compiler.compile_regex(value)
        if kind == "choice":
            try:
                choices = json.loads(value)
            except ValueError as exc:
                raise InvalidInput(f"the choice list is not valid JSON: {exc}") from exc
            if (
                not isinstance(choices, list)
                or not choices
                or not all(isinstance(c, str) for c in choices)
            ):
                raise InvalidInput("the choice list must be a non-empty list of strings")
            return compiler.compile_grammar(choice_grammar(choices))
        if kind == "grammar":
            if grammar_is_lark(value):
                return compiler.compile_lark(value)
            return compiler.compile_grammar(value)
        # structural_tag
        tag = _load_json(
            value, "the structural tag", MAX_JSON_NESTING + STRUCTURAL_TAG_EXTRA_NESTING
        )
        if isinstance(tag, dict) and "structures" in tag:  # the legacy form vLLM still accepts
            try:
                items = [
                    xgr.StructuralTagItem(
                        begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"]
                    )
                    for s in tag["structures"]
                ]
                triggers = list(tag["triggers"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInput(
                    "the structural tag does not compile: each of its structures needs "
                    f"begin, schema and end, and it needs triggers ({exc!r})"
                ) from exc
            return compiler.compile_structural_tag(items, triggers)
        return compiler.compile_structural_tag(value)


class RowGrammar:
    """One sequence's matcher: the tokens its grammar allows next, and whether it has ended.

    ``stop_token_ids`` end the grammar (vLLM passes a request's EOS and stop tokens): at the
    end of a sentence only they are allowed, and accepting one terminates the matcher.
    """

    __slots__ = ("matcher", "stops", "terminated")

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: Iterable[int] = ()) -> None:
        vocab = compiled.tokenizer_info.vocab_size
        self.stops = frozenset(t for t in stop_token_ids if 0 <= t < vocab)
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(self.stops) or None)
        self.terminated = False

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False when the grammar does not allow it (True once it has
        terminated: it constrains nothing after its stop token)."""
        return accept_tokens([self], [token])[0]


def accept_tokens(grammars: Sequence[RowGrammar], tokens: Sequence[int]) -> list[bool]:
    """Advance each grammar by its token, in one call into xgrammar (a call per row costs far
    more than the work when another thread wants the GIL); False where it is not allowed.
    A terminated grammar ignores what follows (vLLM's: a row that goes on after EOS under
    ignore_eos is unconstrained)."""
    ok = [g.terminated for g in grammars]
    live = [i for i, t in enumerate(tokens) if t >= 0 and not ok[i]]
    if not live:
        return ok
    accepted = xgr.BatchGrammarMatcher.batch_accept_token(
        [grammars[i].matcher for i in live], [tokens[i] for i in live]
    )
    for i, good in zip(live, accepted, strict=True):
        ok[i] = good
        grammar = grammars[i]
        # Only a stop token can end it (then the matcher is terminated): no call otherwise.
        if good and tokens[i] in grammar.stops:
            grammar.terminated = grammar.matcher.is_terminated()
    return ok


@functools.cache
def _kernel(device_type: str) -> Any:
    """xgrammar's masking kernel for a device: its Triton kernel on CUDA when Triton is there
    (xgrammar needs it on x86-64 Linux only), its pure-torch one elsewhere."""
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"


class GrammarBitmask:
    """The token bitmask of a batch, allocated once (grown only for a larger batch) and
    applied in place to the logits rows that have a grammar.

    Filling uses xgrammar's BatchGrammarMatcher (one call for all rows, threads where the
    machine has them); on a GPU the bitmask goes up from pinned memory, and xgrammar's kernel
    masks only the listed rows.
    """

    def __init__(self, vocab_size: int, rows: int = 1) -> None:
        self.vocab_size = vocab_size
        self._rows = max(1, rows)
        self._cpu: torch.Tensor | None = None
        self._bits: Any = None  # numpy view of _cpu
        self._device: torch.Tensor | None = None
        self._filler = xgr.BatchGrammarMatcher("auto")

    def _buffers(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cpu is None or self._cpu.shape[0] < rows:
            self._rows = max(self._rows, rows)
            cpu = xgr.allocate_token_bitmask(self._rows, self.vocab_size)
            if device.type == "cuda":
                cpu = cpu.pin_memory()
            self._cpu, self._bits, self._device = cpu, cpu.numpy(), None
        if device.type == "cpu":
            return self._cpu, self._cpu
        if self._device is None or self._device.device != device:
            self._device = self._cpu.to(device)
        return self._cpu, self._device

    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, RowGrammar]]) -> list[int]:
        """Mask ``logits`` [B, V] in place (disallowed tokens -inf) for each (row, grammar);
        returns the rows whose grammar allows no token at all (they cannot be sampled)."""
        cpu, device_mask = self._buffers(logits.shape[0], logits.device)
        index = [i for i, _ in rows]
        self._filler.batch_fill_next_token_bitmask([g.matcher for _, g in rows], cpu, index)
        if device_mask is not cpu:
            count = max(index) + 1
            device_mask[:count].copy_(cpu[:count], non_blocking=True)
        xgr.apply_token_bitmask_inplace(
            logits,
            device_mask,
            vocab_size=min(self.vocab_size, logits.shape[-1]),
            indices=index,
            backend=_kernel(logits.device.type),
        )
        return self._without_tokens(index, logits.shape[0])

    def _without_tokens(self, index: list[int], count: int) -> list[int]:
        """The rows of ``index`` whose bitmask allows nothing (bits past the vocabulary in the
        last word do not count)."""
        bits = self._bits[:count]
        full, tail = divmod(self.vocab_size, 32)
        allowed = bits[:, :full].any(axis=1)
        if tail:
            allowed |= (bits[:, full] & ((1 << tail) - 1)) != 0
        flags = allowed.tolist()
        return [i for i in index if not flags[i]]


__all__ = [
    "GrammarBitmask",
    "GrammarCache",
    "RowGrammar",
    "accept_tokens",
    "choice_grammar",
    "grammar_is_lark",
    "xgrammar_reason",
]
