"""Continuous batching for transformers models: an iteration-level scheduler.

One model thread runs the loop. Every iteration it (1) prefills waiting prompts, within a
token budget, as left-padded groups and merges their KV cache into the running batch, then
(2) runs one decoding step for every running sequence in a single forward pass, samples each
row with its own parameters, streams the tokens out, and (3) drops finished or aborted rows.
A request that arrives mid-generation therefore joins at the next step, and one that
finishes leaves at once; nobody waits for a "wave" to end.

Chunked prefill (vLLM's ``--max-num-batched-tokens``): an iteration processes at most
``max_num_batched_tokens`` tokens. Each running sequence takes one; waiting prompts fill the
rest, whole prompts grouped while their padded size fits, and a prompt larger than what is
left is prefilled in pieces over the next iterations (its cache grows piece by piece), so a
burst of arrivals no longer stalls the running streams for its whole prefill, and the first
prompts of a burst answer before the last are read.

Decoder-only models share one padded DynamicCache ([B, H, T, D] per layer, left padding,
explicit position ids) whose layers grow in place (``kv_cache``): a step writes one position,
a join copies the new rows into free rows, a leave moves rows from the end into the holes. Encoder-decoder models (T5, BART) keep one group per sequence and
are stepped round-robin: their learned/relative positions and cross-attention caches
make merging unsafe, so they interleave without sharing forward passes.

Structured outputs (``params.structured``): the grammar is compiled (or found in the
engine's GrammarCache) before the request is queued, off the model thread; each such row gets
its own xgrammar matcher when admitted, or, with a reasoning parser, after the token that ends
the reasoning (``request.reasoning``), as vLLM's engine starts it. Every step, only the rows that have one fill the
batch's token bitmask and are masked; the sampled token advances the matcher. A finished
grammar allows only the row's EOS and stop tokens (vLLM's all_stop_token_ids), so the
sequence ends there with finish_reason "stop" (with ignore_eos, EOS ends the grammar but not
the sequence, which goes on unconstrained, as in vLLM).

LoRA adapters (``request.adapter``, with ``max_loras`` set): rows of different adapters and of
the base model share groups and forward passes (PEFT's mixed-adapter batches, ``lora.py``); each
group keeps its per-row ``adapter_names`` until its rows change. At most ``max_loras`` distinct
adapters run at once (vLLM's rule): a request whose adapter would exceed that is held, in order,
until a running adapter's last row leaves, while requests behind it for running adapters or the
base model go on (vLLM's scheduler skips it the same way). Adding and removing adapters changes
weights, so it runs on the model thread between iterations (``_exclusive``), never during a
forward pass; with no adapter loaded the model is called exactly as without LoRA.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lmserve_backend_hf.gqa_attention import use_gqa_sdpa
from lmserve_backend_hf.kv_cache import GrowingLayer, fill_holes, make_growing
from lmserve_backend_hf.lora import BASE, PeftAdapters, RowAdapters
from lmserve_backend_hf.sampler import RowState, prompt_logprobs, sample
from lmserve_core.errors import BackendError, InvalidInput, ModelNotReady
from lmserve_core.generation.params import (
    FinishReason,
    GenerationRequest,
    StructuredOutput,
    TokenEvent,
)
from lmserve_core.lora import LoRAAdapter
from lmserve_core.observer import ServingObserver

if TYPE_CHECKING:  # xgrammar (0.5 s to import) loads with the first structured request
    from lmserve_backend_hf.structured import GrammarBitmask, GrammarCache

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Tokens one iteration processes unless told (--max_num_batched_tokens). On a 2-core CPU a
# 512-token piece of SmolLM2-135M takes about as long as a few decoding steps of 16 streams.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    emit: Callable[[TokenEvent | BaseException], None]
    row: RowState
    eos_ids: frozenset[int]
    aborted: bool = False
    finished: bool = False
    length: int = 0  # real tokens in this sequence's KV cache
    last_token: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    queued_seconds: float | None = None  # set when the engine admits it
    compiled_grammar: Any = None  # xgrammar's CompiledGrammar, with params.structured
    # The grammar waits for the end of the model's reasoning (request.reasoning says where).
    grammar_waits: bool = False
    lora_key: str = BASE  # PEFT's name of the row's adapter, set when admitted
    # Puts a token event on the request's queue; called on the event loop, for a whole step's
    # tokens in one hand-off (``_handoff``). None: tokens go through ``emit`` one by one.
    deliver: Callable[[TokenEvent], None] | None = None

    @property
    def id(self) -> str:
        return self.request.request_id


@dataclass(eq=False)
class _Group:
    """Sequences that share one KV cache and one forward pass."""

    seqs: list[_Sequence]
    cache: Any
    mask: torch.Tensor  # [B, T] decoder attention mask (1 = real token)
    encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # enc-dec only
    # PEFT's adapter_names for the rows (None: base rows only), rebuilt when the rows change.
    adapters: RowAdapters | None = None
    adapters_stale: bool = True


@dataclass(eq=False)
class _Partial:
    """A prompt being prefilled in pieces: its first ``done`` tokens are in ``cache``."""

    seq: _Sequence
    adapters: RowAdapters | None
    done: int = 0
    cache: Any = None


class _WaitingQueue:
    """Sequences waiting for a slot, in vLLM's order: lower ``priority`` first, then arrival
    (all priorities are 0 unless the server runs priority scheduling). ``None`` wakes the
    model thread at once (stop)."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue[tuple[float, int, _Sequence | None]] = (
            queue.PriorityQueue()
        )
        self._arrivals = itertools.count()

    def put(self, seq: _Sequence | None) -> None:
        rank = float("-inf") if seq is None else float(seq.request.priority)
        self._queue.put((rank, next(self._arrivals), seq))

    def get(self, timeout: float | None = None) -> _Sequence | None:
        """The next sequence; ``timeout`` None: do not wait. Raises queue.Empty."""
        item = self._queue.get_nowait() if timeout is None else self._queue.get(timeout=timeout)
        return item[2]

    def qsize(self) -> int:
        return self._queue.qsize()


class HFGenerationEngine:
    """Implements lmserve_core's GenerativeBackend on a transformers model."""

    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        eos_token_ids: frozenset[int],
        pad_token_id: int,
        primary_eos_id: int | None = None,
        max_model_len: int,
        vocab_size: int,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        observer: ServingObserver | None = None,
        tokenizer: Any = None,
        max_loras: int | None = None,
    ) -> None:
        """``tokenizer``: the model's transformers tokenizer; structured outputs need it (an
        engine built without one refuses them). ``max_loras``: serve LoRA adapters, at most
        this many distinct ones among running rows (None: no LoRA).
        ``max_num_batched_tokens``: the tokens one iteration processes (see the module's
        chunked prefill); at least ``max_num_seqs``, as vLLM requires."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({max_num_seqs})"
            )
        self.model = model
        self.device = device
        self.eos_token_ids = eos_token_ids
        # The tokenizer's own EOS: ends a sequence without a stop_reason (vLLM's rule).
        self.primary_eos_id = primary_eos_id
        self.pad_token_id = pad_token_id
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        # Padded batches of grouped-query models: attention reads the cache in place instead of
        # a copy per head (gqa_attention); same numbers, the model's own sdpa otherwise.
        self.gqa_sdpa = use_gqa_sdpa(model, device)
        self._waiting = _WaitingQueue()
        self._groups: list[_Group] = []
        # Admitted, not prefilled yet (in admission order), and the one prompt mid-prefill.
        self._pending: list[_Sequence] = []
        self._partial: _Partial | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._base_generator = torch.Generator(device=device)
        self._base_generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        # Observability: decode steps run, the largest batch seen, and the metrics hooks.
        self.steps = 0
        self.max_step_size = 0
        self._observer = observer
        # Structured outputs: the compiled grammars, and the batch's token bitmask (made on
        # first use, by any thread for the cache, by the model thread for the bitmask).
        self._tokenizer = tokenizer
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()
        self._bitmask: GrammarBitmask | None = None
        # LoRA: the adapters (weights change only on the model thread, see _exclusive) and
        # the requests held back by max_loras, by adapter, each in queue order.
        if max_loras is not None and max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.max_loras = max_loras
        self._lora: PeftAdapters | None = None
        if max_loras is not None:
            start = getattr(model.config, "decoder_start_token_id", None)
            self._lora = PeftAdapters(model, device=device, decoder_start_token_id=start)
        self._held: dict[str, deque[_Sequence]] = {}
        self._held_count = 0
        self._held_purged = 0.0
        self._commands: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]]
        ] = queue.SimpleQueue()
        self._command_lock = threading.Lock()
        self._accepting_commands = False  # the model thread runs and takes commands

    # --- GenerativeBackend ----------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def is_encoder_decoder(self) -> bool:
        return self._is_enc_dec

    @property
    def running(self) -> int:
        """Admitted sequences: decoding, or waiting for (the rest of) their prefill."""
        return self._decoding() + len(self._pending) + (self._partial is not None)

    def _decoding(self) -> int:
        return sum(len(g.seqs) for g in self._groups)

    def num_unfinished(self) -> int:
        return self.running + self._waiting.qsize() + self._held_count

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmserve-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._waiting.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def check_structured_output(self, spec: StructuredOutput) -> None:
        self.grammar_cache.compile(spec)

    @property
    def grammar_cache(self) -> GrammarCache:
        """The engine's compiled grammars (InvalidInput when it has no tokenizer)."""
        if self._tokenizer is None:
            raise InvalidInput(
                "structured outputs are not available: the engine was built without the "
                "model's tokenizer"
            )
        with self._grammars_lock:
            if self._grammars is None:
                from lmserve_backend_hf.structured import GrammarCache

                self._grammars = GrammarCache(
                    self._tokenizer, self._vocab_size, stop_token_ids=self.eos_token_ids
                )
            return self._grammars

    def check_health(self) -> None:
        if self._dead is not None:
            raise BackendError(f"the generation engine stopped: {self._dead}")
        if self._thread is not None and not self._thread.is_alive() and not self._stopping.is_set():
            raise BackendError("the generation engine thread is not running")

    # --- AdapterBackend -------------------------------------------------------------
    async def add_adapter(self, adapter: LoRAAdapter) -> None:
        """Load ``adapter`` (PEFT); its files are read off the model thread, and only putting
        the weights into the model pauses generation. InvalidInput when it does not fit."""
        lora = self._require_lora()
        if lora.has(adapter):
            return
        prepared = await asyncio.to_thread(lora.prepare, adapter)

        def install() -> None:
            lora.install(prepared)
            self._adapters_changed()

        await asyncio.to_thread(self._exclusive, install)

    async def remove_adapter(self, adapter: LoRAAdapter) -> None:
        """Unload ``adapter``; a request that still uses it (the core drains them first) fails."""
        lora = self._require_lora()

        def remove() -> None:
            self._fail_adapter_rows(adapter)
            lora.remove(adapter)
            self._adapters_changed()

        await asyncio.to_thread(self._exclusive, remove)

    @property
    def adapters(self) -> list[LoRAAdapter]:
        """The LoRA adapters loaded now."""
        return [] if self._lora is None else self._lora.adapters

    def _require_lora(self) -> PeftAdapters:
        if self._lora is None:
            raise InvalidInput(
                "LoRA adapters are not enabled for this model (start it with --enable_lora)",
                param="model",
            )
        return self._lora

    def _exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` while no forward pass runs: on the model thread between two iterations,
        or here when no model thread runs. Blocks (call it in a worker thread)."""
        with self._command_lock:
            if not self._accepting_commands:
                return fn()
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._commands.put((fn, done))
            self._waiting.put(None)  # wake a model thread waiting for requests
        return done.result()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode(False):
                    result = fn()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(result)

    def _adapters_changed(self) -> None:
        for group in self._groups:
            group.adapters_stale = True

    def _fail_adapter_rows(self, adapter: LoRAAdapter) -> None:
        """Rows and held requests of an adapter being removed end with an error (a guard: the
        core waits for them before it removes an adapter)."""
        gone = InvalidInput(f"the LoRA adapter {adapter.name!r} was unloaded", param="model")
        for group in self._groups:
            for seq in group.seqs:
                if seq.request.adapter is not None and seq.request.adapter.int_id == adapter.int_id:
                    self._finish_error(seq, gone)
        for key in list(self._held):
            for seq in self._held[key]:
                if seq.request.adapter is not None and seq.request.adapter.int_id == adapter.int_id:
                    self._finish_error(seq, gone)
                    seq.aborted = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.check_health()
        if self._stopping.is_set() or self._loop is None:
            raise ModelNotReady("the generation engine is not running")
        if request.adapter is not None:
            self._require_lora().key(request.adapter)  # InvalidInput when not loaded
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        loop = self._loop

        def emit(event: TokenEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        seq = _Sequence(request, emit, self._row_state(request), self.eos_token_ids,
                        deliver=events.put_nowait)  # fmt: skip
        spec = request.params.structured
        if spec is not None:
            cache = self.grammar_cache
            compiled = cache.get(spec)  # cached: no thread hop (the server checked it first)
            if compiled is None:
                compiled = await asyncio.to_thread(cache.compile, spec)
            seq.compiled_grammar = compiled
        self._waiting.put(seq)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            # Early close (stop string, disconnect, cancel): abort within one step.
            seq.aborted = True  # the model thread drops it before the next step

    # --- model thread ----------------------------------------------------------------
    def _row_state(self, request: GenerationRequest) -> RowState:
        p = request.params
        # A seeded row draws from its own generator (its tokens do not depend on the batch);
        # the others share the engine's, in one batched draw per step (sampler._draw_batch).
        generator = None
        if not p.greedy and p.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(p.seed & 0xFFFF_FFFF_FFFF_FFFF)
        # ignore_eos as vLLM means it: EOS may be sampled, it just does not end the sequence.
        stop_ids = frozenset(p.stop_token_ids) | (
            frozenset() if p.ignore_eos else self.eos_token_ids
        )
        return RowState(p, list(request.prompt_ids), generator=generator, stop_ids=stop_ids)

    def _run(self) -> None:
        with self._command_lock:
            self._accepting_commands = True
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._iteration()
        except Exception as exc:  # a bug, not a request's fault: fail everyone, stay dead
            logger.exception("generation engine crashed")
            self._dead = f"{type(exc).__name__}: {exc}"
            self._fail_all(BackendError(f"generation engine crashed: {exc}"))
        finally:
            self._fail_all(ModelNotReady("the server is shutting down"))
            with self._command_lock:  # later adapter changes run in their caller's thread
                self._accepting_commands = False
                self._run_commands()

    def _iteration(self) -> None:
        if not self._commands.empty():
            self._run_commands()
        block = not self._groups and not self._pending and self._partial is None
        # Arrivals of one iteration shortest first (less padding in a group, earlier first
        # tokens); after those admitted before them, so none waits behind later ones.
        self._pending.extend(sorted(self._admit(block), key=lambda s: len(s.request.prompt_ids)))
        debugging = logger.isEnabledFor(logging.DEBUG)  # the timing below only for its log line
        started = time.perf_counter() if debugging else 0.0
        prefilled = 0
        if self._pending or self._partial is not None:
            budget = self.max_num_batched_tokens - self._decoding()
            prefilled = budget - self._prefill_step(budget)
        prefill_done = time.perf_counter() if debugging else 0.0
        rows = self._decoding() if debugging else 0
        if self._groups:
            try:
                self._decode()
            except Exception as exc:
                logger.exception("decoding step failed")
                for group in self._groups:
                    for seq in group.seqs:
                        self._finish_error(seq, BackendError(f"decoding failed: {exc}"))
                self._groups = []
        self._drop_finished()
        if prefilled and debugging:  # where a step's time went
            logger.debug(
                "iteration: prefill %d tokens in %.0f ms, decode %d rows in %.0f ms, %d waiting",
                prefilled, (prefill_done - started) * 1000, rows,
                (time.perf_counter() - prefill_done) * 1000, len(self._pending),
            )  # fmt: skip

    def _admit(self, block: bool) -> list[_Sequence]:
        room = self.max_num_seqs - self.running
        new: list[_Sequence] = []
        # Distinct adapters of the running and admitted rows (computed when first needed).
        active: set[str] | None = None
        if self._held and room > 0:
            active = self._running_adapters()
            self._admit_held(new, room, active)
        while len(new) < room:
            try:
                seq = self._waiting.get(timeout=0.5 if (block and not new) else None)
            except queue.Empty:
                break
            if seq is None:  # stop() or adapter-change wake-up
                break
            if seq.aborted:
                continue
            if seq.request.adapter is not None:
                if active is None:
                    active = self._running_adapters()
                if not self._adapter_fits(seq, active):
                    continue
            self._start(seq, new)
        return new

    def _start(self, seq: _Sequence, new: list[_Sequence]) -> None:
        seq.queued_seconds = time.perf_counter() - seq.enqueued
        if seq.compiled_grammar is not None:
            if not _reasoning_ended_in_prompt(seq.request):
                seq.grammar_waits = True  # vLLM's: the constraint starts after the reasoning
            elif not self._start_grammar(seq):
                return
        new.append(seq)

    def _adapter_fits(self, seq: _Sequence, active: set[str]) -> bool:
        """Give ``seq`` its adapter key; False when it failed (adapter not loaded) or is held
        (its adapter would exceed max_loras)."""
        assert seq.request.adapter is not None
        try:
            key = self._require_lora().key(seq.request.adapter)
        except InvalidInput as exc:
            self._finish_error(seq, exc)
            return False
        seq.lora_key = key
        if key in active:
            return True
        if self.max_loras is not None and len(active) >= self.max_loras:
            self._held.setdefault(key, deque()).append(seq)
            self._held_count += 1
            return False
        active.add(key)
        return True

    def _admit_held(self, new: list[_Sequence], room: int, active: set[str]) -> None:
        """Start held requests whose adapter fits now: oldest adapter first, each adapter's in
        order. Work per step: the number of held adapters, not of held requests."""
        now = time.perf_counter()
        if now - self._held_purged > 1.0:  # drop aborted ones now and then (num_unfinished)
            self._held_purged = now
            for key in list(self._held):
                kept = deque(s for s in self._held[key] if not s.aborted)
                self._held_count -= len(self._held[key]) - len(kept)
                if kept:
                    self._held[key] = kept
                else:
                    del self._held[key]
        for key in sorted(self._held, key=lambda k: _queue_order(self._held[k][0])):
            if key not in active and self.max_loras is not None and len(active) >= self.max_loras:
                continue
            waiting = self._held[key]
            while waiting and len(new) < room:
                seq = waiting.popleft()
                self._held_count -= 1
                if seq.aborted:
                    continue
                adapter = seq.request.adapter
                assert adapter is not None
                if not self._require_lora().has(adapter):
                    gone = f"the LoRA adapter {adapter.name!r} is not loaded"
                    self._finish_error(seq, InvalidInput(gone, param="model"))
                    continue
                active.add(key)
                self._start(seq, new)
            if not waiting:
                del self._held[key]
            if len(new) >= room:
                return

    def _running_adapters(self) -> set[str]:
        return {s.lora_key for g in self._groups for s in g.seqs if s.lora_key != BASE}

    def _row_adapters(self, seqs: list[_Sequence]) -> RowAdapters | None:
        lora = self._lora
        if lora is None or not lora.loaded:
            return None
        return lora.row_adapters([s.lora_key for s in seqs])

    def _group_adapters(self, group: _Group) -> RowAdapters | None:
        if group.adapters_stale:
            group.adapters = self._row_adapters(group.seqs)
            group.adapters_stale = False
        return group.adapters

    def _call(self, module: Any, adapters: RowAdapters | None, **inputs: Any) -> Any:
        """``module(**inputs)`` (the model or its encoder), with the rows' adapters when any
        row has one; without, exactly the call the engine makes with LoRA off."""
        if adapters is None:
            return module(**inputs)
        lora = self._lora
        assert lora is not None
        lora.current = adapters
        try:
            return module(**inputs)
        finally:
            lora.current = None

    def _start_grammar(self, seq: _Sequence) -> bool:
        """Give an admitted row its matcher; False (the request failed) if xgrammar cannot."""
        from lmserve_backend_hf.structured import GrammarBitmask, RowGrammar

        # vLLM's all_stop_token_ids: the grammar ends with EOS or a stop token.
        stops = self.eos_token_ids | frozenset(seq.request.params.stop_token_ids)
        try:
            seq.row.grammar = RowGrammar(seq.compiled_grammar, stops)
            if self._bitmask is None:
                self._bitmask = GrammarBitmask(self._vocab_size, self.max_num_seqs)
        except Exception as exc:
            logger.exception("structured output matcher failed")
            self._finish_error(seq, BackendError(f"structured output matcher failed: {exc}"))
            return False
        return True

    # prefill ------------------------------------------------------------------------
    def _prefill_step(self, budget: int) -> int:
        """Prefill waiting prompts with at most ``budget`` tokens (padding included): first
        the prompt mid-prefill, then whole prompts in admission order, grouped while their
        padded size fits; the first that does not fit alone starts in pieces. Prompts with
        prompt logprobs and encoder-decoder prompts run whole, alone. Returns the budget
        left (negative after a prompt that must run whole)."""
        self._pending = [s for s in self._pending if not self._dropped(s)]
        if self._partial is not None and self._dropped(self._partial.seq):
            self._partial = None
        if self._partial is not None:
            budget -= self._guarded([self._partial.seq], self._prefill_piece, budget) or 0
        group: list[_Sequence] = []
        group_longest = 0  # the group's longest prompt: every row is padded to it
        while self._partial is None and self._pending and budget > 0:
            seq = self._pending[0]
            size = len(seq.request.prompt_ids)
            alone = self._is_enc_dec or seq.request.params.prompt_logprobs is not None
            longest = max(size, group_longest)
            if not alone and (len(group) + 1) * longest <= budget:
                group.append(self._pending.pop(0))
                group_longest = longest
                continue
            if group:
                break
            self._pending.pop(0)
            if alone:
                if self._is_enc_dec:
                    self._guarded([seq], self._prefill_encoder_decoder, seq)
                else:
                    self._guarded([seq], self._prefill_decoder, [seq], full_logits=True)
                budget -= size
            else:
                self._partial = _Partial(seq, self._row_adapters([seq]))
                budget -= self._guarded([seq], self._prefill_piece, budget) or 0
        if group:
            self._guarded(group, self._prefill_decoder, group, full_logits=False)
            budget -= len(group) * group_longest
        return budget

    def _dropped(self, seq: _Sequence) -> bool:
        if seq.aborted:
            seq.finished = True
        return seq.finished

    def _guarded(self, seqs: list[_Sequence], fn: Callable[..., _T], *args: Any,
                 **kwargs: Any) -> _T | None:  # fmt: skip
        """``fn(*args, **kwargs)``; when it raises, ``seqs`` end with the error (the engine
        goes on) and the result is None."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            logger.exception("prefill failed")
            if self._partial is not None and self._partial.seq in seqs:
                self._partial = None
            for seq in seqs:
                self._finish_error(seq, BackendError(f"prefill failed: {exc}"))
            return None

    def _prefill_piece(self, budget: int) -> int:
        """The next piece (at most ``budget`` tokens) of the prompt mid-prefill; the last
        one samples its first token and merges it into the running batch."""
        part = self._partial
        assert part is not None
        seq, prompt = part.seq, part.seq.request.prompt_ids
        start, end = part.done, min(len(prompt), part.done + budget)
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, dtype=torch.long, device=self.device).unsqueeze(0)
        out = self._call(
            self.model, part.adapters, input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=part.cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        part.cache, part.done = out.past_key_values, end
        if end == len(prompt):
            self._partial = None
            seq.length = len(prompt)
            group = _Group([seq], part.cache, mask, adapters=part.adapters, adapters_stale=False)
            self._emit_sampled(group.seqs, out.logits[:, -1, :].float(), None)
            self._merge(group)
        return end - start

    def _prefill_decoder(self, seqs: list[_Sequence], *, full_logits: bool) -> None:
        prompts = [s.request.prompt_ids for s in seqs]
        length = max(len(p) for p in prompts)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt) :] = torch.tensor(prompt)
            mask[i, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        adapters = self._row_adapters(seqs)
        out = self._call(
            self.model, adapters, input_ids=ids, attention_mask=mask, position_ids=positions,
            use_cache=True, logits_to_keep=0 if full_logits else 1,
        )  # fmt: skip
        logits = out.logits[:, -1, :].float()
        for i, seq in enumerate(seqs):
            seq.length = len(prompts[i])
        prompt_lps = None
        if full_logits:
            k = seqs[0].request.params.prompt_logprobs or 0
            prompt_lps = prompt_logprobs(out.logits[0], prompts[0], k)
        group = _Group(
            list(seqs), out.past_key_values, mask, adapters=adapters, adapters_stale=False
        )
        self._emit_sampled(group.seqs, logits, prompt_lps)
        self._merge(group)

    def _prefill_encoder_decoder(self, seq: _Sequence) -> None:
        prompt = torch.tensor([seq.request.prompt_ids], dtype=torch.long, device=self.device)
        enc_mask = torch.ones_like(prompt)
        adapters = self._row_adapters([seq])
        encoder = self.model.get_encoder()
        encoder_outputs = self._call(encoder, adapters, input_ids=prompt, attention_mask=enc_mask)
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.pad_token_id
        dec = torch.tensor([[start]], dtype=torch.long, device=self.device)
        out = self._call(
            self.model,
            adapters,
            encoder_outputs=encoder_outputs,
            attention_mask=enc_mask,
            decoder_input_ids=dec,
            use_cache=True,
        )
        seq.length = 1
        group = _Group([seq], out.past_key_values, torch.ones((1, 1), dtype=torch.long, device=self.device),
                       encoder={"encoder_outputs": encoder_outputs, "attention_mask": enc_mask},
                       adapters=adapters, adapters_stale=False)  # fmt: skip
        self._emit_sampled(group.seqs, out.logits[:, -1, :].float(), None)
        self._groups.append(group)

    # merging and decoding -------------------------------------------------------------
    def _merge(self, group: _Group) -> None:
        """Join ``group``'s rows to the running decoder batch (the first group without an
        encoder), its cache copied into the batch's growing buffers (``kv_cache``); a cache
        that is not a plain ``DynamicCache`` (sliding window, hybrid) stays a group alone."""
        if not _mergeable(group.cache):
            self._groups.append(group)
            return
        live = [g for g in self._groups if not g.encoder]
        if not live:
            # Later steps write into the buffers instead of re-concatenating. A lone row stays
            # as it is until another joins: its torch.cat is one small op, a buffer's write three.
            if len(group.seqs) > 1:
                make_growing(group.cache)
            self._groups.append(group)
            return
        target = live[0]
        if not _mergeable(target.cache):
            self._groups.append(group)
            return
        make_growing(target.cache)
        for mine, theirs in zip(target.cache.layers, group.cache.layers, strict=True):
            mine.extend(theirs.keys, theirs.values)
        total = max(target.mask.shape[1], group.mask.shape[1])
        target.mask = torch.cat(
            [_pad_left_2d(target.mask, total), _pad_left_2d(group.mask, total)], dim=0
        )
        target.seqs.extend(group.seqs)
        target.adapters_stale = True

    def _decode(self) -> None:
        for group in list(self._groups):
            active = [s for s in group.seqs if not s.finished and not s.aborted]
            if len(active) != len(group.seqs):
                self._select(group, active)
            if not group.seqs:
                continue
            ids = torch.tensor(
                [[s.last_token] for s in group.seqs], dtype=torch.long, device=self.device
            )
            ones = torch.ones((len(group.seqs), 1), dtype=group.mask.dtype, device=self.device)
            group.mask = torch.cat([group.mask, ones], dim=1)
            adapters = self._group_adapters(group)
            if group.encoder:
                out = self._call(
                    self.model, adapters, decoder_input_ids=ids, decoder_attention_mask=group.mask,
                    past_key_values=group.cache, use_cache=True, **group.encoder,
                )  # fmt: skip
            else:
                positions = torch.tensor(
                    [[s.length] for s in group.seqs], dtype=torch.long, device=self.device
                )
                out = self._call(
                    self.model, adapters, input_ids=ids, attention_mask=group.mask,
                    position_ids=positions, past_key_values=group.cache, use_cache=True,
                )  # fmt: skip
            group.cache = out.past_key_values
            for seq in group.seqs:
                seq.length += 1
            self.steps += 1
            self.max_step_size = max(self.max_step_size, len(group.seqs))
            if self._observer is not None:
                self._observer.decode_step(len(group.seqs))
            self._emit_sampled(group.seqs, out.logits[:, -1, :].float(), None)

    def _emit_sampled(
        self, seqs: list[_Sequence], logits: torch.Tensor, prompt_lps: tuple[Any, ...] | None
    ) -> None:
        sampled = sample(logits, [s.row for s in seqs], self._bitmask, self._base_generator)
        rejected: set[int] = set()
        constrained = [(i, s.row.grammar) for i, s in enumerate(seqs) if s.row.grammar is not None]
        if constrained:  # one call into xgrammar for all of them
            from lmserve_backend_hf.structured import accept_tokens

            ok = accept_tokens([g for _, g in constrained], [sampled[i][0] for i, _ in constrained])
            rejected = {i for (i, _), good in zip(constrained, ok, strict=True) if not good}
        handoff: list[tuple[Callable[[TokenEvent], None], TokenEvent]] = []
        for i, (seq, (token, lp)) in enumerate(zip(seqs, sampled, strict=True)):
            if i in rejected:
                # vLLM ends such a request with an error too (it cannot happen unless the
                # grammar leaves no token the model has).
                reason = "allows no token" if token < 0 else f"rejected token {token}"
                self._finish_error(
                    seq, BackendError(f"the structured output grammar {reason} at this point")
                )
                continue
            seq.row.add(token)
            seq.last_token = token
            if seq.grammar_waits and _reasoning_ends_with(seq, token):
                seq.grammar_waits = False  # the token after this one is the first constrained
                if not self._start_grammar(seq):
                    continue
            params = seq.request.params
            finish: FinishReason | None = None
            stop_token = False
            stop_reason = None
            # A grammar ends only on one of these (its stop tokens), so a finished grammar is
            # a finished sequence, except for EOS under ignore_eos: as in vLLM the sequence
            # goes on, unconstrained.
            if (token in seq.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
                finish, stop_token = "stop", True
                if token != self.primary_eos_id or params.ignore_eos:
                    stop_reason = token
            elif len(seq.row.output_ids) >= params.max_tokens or (
                not self._is_enc_dec and seq.length + 1 >= self._max_model_len
            ):
                finish = "length"
            if finish is not None:
                seq.finished = True
            first = len(seq.row.output_ids) == 1
            event = TokenEvent(token, lp, finish, stop_token, prompt_lps if i == 0 else None,
                               seq.queued_seconds if first else None, stop_reason)  # fmt: skip
            if seq.deliver is None:
                seq.emit(event)
            else:
                handoff.append((seq.deliver, event))
        if handoff and self._loop is not None:
            # One wake-up of the event loop per step instead of one per row.
            self._loop.call_soon_threadsafe(_handoff, handoff)

    def _select(self, group: _Group, keep: list[_Sequence]) -> None:
        index = {id(s): i for i, s in enumerate(group.seqs)}
        rows = [index[id(s)] for s in keep]
        growing = not group.encoder and _growing(group.cache)
        if growing:
            # Leaving rows' places are taken by rows from the end: only those are copied.
            rows = fill_holes(rows)
            keep = [group.seqs[r] for r in rows]
        group.seqs = keep
        group.adapters_stale = True
        if not keep:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        group.mask = group.mask.index_select(0, idx)
        if group.encoder:
            return  # enc-dec groups hold one sequence
        # Drop columns that are padding for every remaining row.
        first = int((group.mask.sum(dim=0) > 0).nonzero()[0])
        group.mask = group.mask[:, first:]
        if growing:
            for layer in group.cache.layers:
                layer.select(rows, first)
            return
        for layer in group.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]

    def _drop_finished(self) -> None:
        for group in self._groups:
            for seq in group.seqs:
                if seq.aborted and not seq.finished:
                    seq.finished = True
        kept = []
        for group in self._groups:
            active = [s for s in group.seqs if not s.finished]
            if len(active) != len(group.seqs):
                self._select(group, active)
            if group.seqs:
                kept.append(group)
        self._groups = kept

    def _finish_error(self, seq: _Sequence, exc: BaseException) -> None:
        if not seq.finished:
            seq.finished = True
            seq.emit(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for group in self._groups:
            for seq in group.seqs:
                self._finish_error(seq, exc)
        self._groups = []
        admitted = self._pending + ([self._partial.seq] if self._partial is not None else [])
        self._pending, self._partial = [], None
        for seq in admitted:
            self._finish_error(seq, exc)
        held, self._held, self._held_count = self._held, {}, 0
        for waiting in held.values():
            for row in waiting:
                self._finish_error(row, exc)
        while True:
            try:
                queued = self._waiting.get()
            except queue.Empty:
                break
            if queued is not None:
                self._finish_error(queued, exc)


def _handoff(events: list[tuple[Callable[[TokenEvent], None], TokenEvent]]) -> None:
    for deliver, event in events:
        deliver(event)


def _queue_order(seq: _Sequence) -> tuple[int, float]:
    return seq.request.priority, seq.enqueued


def _reasoning_ended_in_prompt(request: GenerationRequest) -> bool:
    gate = request.reasoning
    if gate is None:
        return True
    if gate.ended_in_prompt is not None:
        return gate.ended_in_prompt
    return gate.ends_in(request.prompt_ids)  # vLLM's engine asks its parser about the prompt


def _reasoning_ends_with(seq: _Sequence, token: int) -> bool:
    gate = seq.request.reasoning
    assert gate is not None
    return gate.ends_with([*seq.request.prompt_ids, *seq.row.output_ids], [token])


def _mergeable(cache: Any) -> bool:
    """A plain ``DynamicCache`` (its layers plain or already growing), filled."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(
        type(layer) in (DynamicLayer, GrowingLayer) and layer.keys is not None for layer in layers
    )


def _growing(cache: Any) -> bool:
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is GrowingLayer for layer in layers)


def _pad_left_2d(t: torch.Tensor, total: int) -> torch.Tensor:
    missing = total - t.shape[1]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], missing)), t], dim=1)


__all__ = ["HFGenerationEngine"]
