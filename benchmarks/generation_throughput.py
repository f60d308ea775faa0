"""Output-token throughput of lmserve's Hugging Face generation engine, in one run.

Measures, on the same prompts and the same model weights, all greedy with EOS ignored so
that every request generates exactly ``--tokens`` tokens:

(a) serial: transformers ``model.generate`` one prompt at a time (the baseline);
(b) lmserve's ``HFGenerationEngine`` with C concurrent streams for each C in ``--concurrency``:
    aggregate output tokens/s, TTFT and TPOT (``vllm bench serve`` definitions) and the
    engine's largest decoding batch (``max_step_size``, the proof that it batched);
(c) transformers' own continuous batching (``model.generate_batch``), all requests at once;
(d) greedy agreement of (b) at the smallest and largest C with (a), request by request.

Absolute times on a shared 2-core box swing a lot between runs; what this script reports is
ratios measured in the same process minutes apart (see shared/TESTING.md, "Benchmarks on a
noisy 2-core machine").

    uv run python benchmarks/generation_throughput.py --smoke
    uv run python benchmarks/generation_throughput.py --tokens 32 --prompts 16 \
        --concurrency 1,4,16 --threads 1 --json-out gen.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompts import PROMPTS as BENCHMARK_PROMPTS  # benchmarks/ is on sys.path when run as a script

if TYPE_CHECKING:  # torch is imported only after the thread count is fixed (see main()).
    from lmserve_backend_hf.engine import HFGenerationEngine

DEFAULT_MODEL = "smollm2-135m-instruct"

PROMPTS = BENCHMARK_PROMPTS

SMOKE = {"tokens": 8, "prompts": 4, "concurrency": [1, 4]}
FULL = {"tokens": 32, "prompts": 16, "concurrency": [1, 4, 16]}


# --- results -------------------------------------------------------------------------------
@dataclass
class RequestTiming:
    """One request as a client sees it (times in seconds, from the client's own clock)."""

    prompt_index: int
    token_ids: list[int]
    ttft: float  # request sent -> first token received
    e2e: float  # request sent -> last token received

    @property
    def tpot(self) -> float | None:
        # vllm bench serve: TPOT = (e2e - TTFT) / (output tokens - 1); undefined for 1 token.
        n = len(self.token_ids)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


@dataclass
class PhaseResult:
    name: str
    requests: int
    output_tokens: int
    wall_s: float
    concurrency: int | None = None
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # Per-request generated ids, in request order: the agreement check compares these.
    tokens_by_request: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self, serial_tps: float | None) -> dict[str, Any]:
        out = asdict(self)
        # Kept (a few hundred ints) so a disagreement can be inspected after the run.
        out["token_ids"] = out.pop("tokens_by_request")
        out["output_tokens_per_s"] = round(self.tokens_per_s, 3)
        if serial_tps and self.error is None:
            out["vs_serial"] = round(self.tokens_per_s / serial_tps, 3)
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    if not ms:
        return {}
    return {
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


# --- arguments -----------------------------------------------------------------------------
def parse_concurrency(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1: {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Output-token throughput: serial generate vs lmserve's HF engine vs "
        "transformers' generate_batch (greedy, EOS ignored).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"built-in model name or a saved model directory (default {DEFAULT_MODEL})")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=None,
                        help="generated tokens per request (default 32; --smoke: 8)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=None,
                        help="distinct prompts; the 16 built-in ones are cycled (default 16; --smoke: 4)")  # fmt: skip
    parser.add_argument("--concurrency", type=parse_concurrency, default=None,
                        help="concurrent streams for the engine, comma-separated (default 1,4,16; --smoke: 1,4)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    parser.add_argument(
        "--json-out", type=Path, default=None, help="write every number here as JSON"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the script works"
    )
    parser.add_argument("--skip-generate-batch", action="store_true",
                        help="leave out transformers' generate_batch (c)")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    # Explicit flags win over the --smoke / full presets.
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens < 1 or args.prompts < 1 or args.threads < 1:
        parser.error("--tokens, --prompts and --threads must be >= 1")
    return args


# --- model and prompts -----------------------------------------------------------------------
def load_engine(model: str, threads: int, max_num_seqs: int) -> tuple[HFGenerationEngine, Path]:
    """Build the engine exactly as `lmserve serve` does, through the backend's create_backend."""
    from lmserve_backend_hf import convert_builtin, create_backend
    from lmserve_core.backend import LoadRequest
    from lmserve_core.model_files import read_model_config, resolve_model_source
    from lmserve_core.settings import ServeSettings
    from lmserve_core.tasks import Task

    source = resolve_model_source(model_id=model, model_dir=None)
    if source.needs_conversion and source.builtin is not None:
        convert_builtin(source.builtin)  # GGUF built-in -> cached safetensors folder, once
    settings = ServeSettings(torch_threads=threads, max_num_seqs=max_num_seqs)
    request = LoadRequest(settings, source, Task.text_generation, read_model_config(source.path))
    loaded = create_backend(request)
    engine = loaded.backend
    from lmserve_backend_hf.engine import HFGenerationEngine

    if not isinstance(engine, HFGenerationEngine):
        raise SystemExit(f"expected an HFGenerationEngine, got {type(engine).__name__}")
    if engine.is_encoder_decoder:
        # Serial generate() below assumes a decoder-only prompt layout.
        raise SystemExit("this benchmark covers decoder-only models")
    return engine, source.path


def encode_prompts(tokenizer: Any, count: int) -> tuple[list[list[int]], str]:
    """Token ids of `count` prompts, cycling the built-in list.

    The chat template is used when the model has one, because that is what a chat server
    feeds the engine (and it makes prompts of realistic, varied lengths).
    """
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    if getattr(tokenizer, "chat_template", None):
        rendered = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
        return [[int(t) for t in p] for p in ids], "chat_template"
    ids = [tokenizer(t)["input_ids"] for t in texts]
    return [[int(t) for t in p] for p in ids], "plain"


# --- (a) serial transformers generate ----------------------------------------------------------
def run_serial(
    model: Any, prompts: list[list[int]], tokens: int, eos: list[int], pad: int
) -> PhaseResult:
    import torch

    device = model.device

    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        # eos_token_id=-1: EOS may be picked but never stops generation, which is what the
        # engine's ignore_eos means (as in vLLM), so greedy outputs stay comparable.
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
            do_sample=False, eos_token_id=-1, pad_token_id=pad,
        )  # fmt: skip
        return [int(t) for t in out[0, len(prompt) :].tolist()]

    generate(prompts[0], 2)  # warm-up: first-call allocations and lazy init are not throughput
    outputs: list[list[int]] = []
    latencies: list[float] = []
    started = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        outputs.append(generate(prompt, tokens))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return PhaseResult(
        name="serial generate", requests=len(prompts), output_tokens=sum(len(o) for o in outputs),
        wall_s=wall, concurrency=1, extra={"request_latency_ms": latency_summary(latencies)},
        tokens_by_request=outputs,
    )  # fmt: skip


# --- (b) lmserve's engine ----------------------------------------------------------------------
async def run_engine(
    engine: HFGenerationEngine,
    prompts: list[list[int]],
    tokens: int,
    levels: list[int],
    n_requests: int,
) -> list[PhaseResult]:
    from lmserve_core.generation.params import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(request_id: str, index: int, gate: asyncio.Semaphore) -> RequestTiming:
        async with gate:
            sent = time.perf_counter()
            first: float | None = None
            ids: list[int] = []
            request = GenerationRequest(request_id, prompts[index % len(prompts)], params)
            async for event in engine.generate(request):
                if event.token_id is not None:
                    if first is None:
                        first = time.perf_counter()
                    ids.append(event.token_id)
            done = time.perf_counter()
            return RequestTiming(index % len(prompts), ids, (first or done) - sent, done - sent)

    results: list[PhaseResult] = []
    await engine.start()
    try:
        # Warm-up request, as for the serial baseline.
        warm = GenerationRequest(
            "warm-up", prompts[0], SamplingParams(max_tokens=2, temperature=0.0)
        )
        async for _ in engine.generate(warm):
            pass
        for level in levels:
            # The engine's counters are cumulative; reset them so each level reports its own.
            engine.steps = 0
            engine.max_step_size = 0
            gate = asyncio.Semaphore(level)  # at most `level` requests in flight, FIFO refill
            started = time.perf_counter()
            timings = await asyncio.gather(
                *(one(f"c{level}-{i}", i, gate) for i in range(n_requests))
            )
            wall = time.perf_counter() - started
            out_tokens = sum(len(t.token_ids) for t in timings)
            # The first token of each request comes from its prefill; the rest from decode steps.
            decode_tokens = out_tokens - len(timings)
            results.append(PhaseResult(
                name=f"lmserve engine C={level}", requests=len(timings), output_tokens=out_tokens,
                wall_s=wall, concurrency=level,
                ttft_ms=latency_summary([t.ttft for t in timings]),
                tpot_ms=latency_summary([tp for t in timings if (tp := t.tpot) is not None]),
                extra={"max_step_size": engine.max_step_size, "decode_steps": engine.steps,
                       "mean_step_size": round(decode_tokens / engine.steps, 3) if engine.steps else 0.0,
                       "e2e_ms": latency_summary([t.e2e for t in timings])},
                tokens_by_request=[t.token_ids for t in timings],
            ))  # fmt: skip
    finally:
        await engine.stop()
    return results


# --- (c) transformers' continuous batching -----------------------------------------------------
class _ErrorLog(logging.Handler):
    """generate_batch logs failures and returns partial results instead of raising."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_generate_batch(model: Any, requests: list[list[int]], tokens: int, pad: int) -> PhaseResult:
    name = "transformers generate_batch"
    errors = _ErrorLog()
    cb_logger = logging.getLogger("transformers.generation.continuous_batching")
    cb_logger.addHandler(errors)
    # lmserve's engine switched the shared model to its own grouped-query SDPA function, which
    # transformers' continuous batching refuses by name: give the peer transformers' own sdpa.
    engine_attention = getattr(model.config, "_attn_implementation", None)
    switched = engine_attention not in (None, "sdpa", "eager") and not str(
        engine_attention
    ).startswith("paged")
    if switched:
        model.set_attn_implementation("sdpa")
    try:
        from transformers import GenerationConfig

        def config(n: int) -> Any:
            # generate_batch cannot ban EOS: transformers 5.19 marks MinNewTokensLengthLogitsProcessor
            # `supports_continuous_batching = False` and leaves it out. eos_token_id=-1 turns
            # stopping off instead, so every request still generates exactly n tokens (equal work);
            # where greedy picks EOS, the baseline picks the runner-up and the agreement check
            # counts that request as different.
            return GenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=pad
            )

        # Warm-up on one short request: first-call costs are not throughput. The timed call still
        # includes building its own manager and KV-cache blocks, which every generate_batch pays.
        model.generate_batch(inputs=[requests[0]], generation_config=config(2), progress_bar=False)
        errors.messages.clear()
        started = time.perf_counter()
        outputs = model.generate_batch(
            inputs=requests, generation_config=config(tokens), progress_bar=False
        )
        wall = time.perf_counter() - started
    except Exception as exc:  # unsupported on this model / device / version: report, don't crash
        return PhaseResult(name=name, requests=len(requests), output_tokens=0, wall_s=0.0,
                           error=f"{type(exc).__name__}: {exc}")  # fmt: skip
    finally:
        cb_logger.removeHandler(errors)
        if switched:  # back to the engine's, for any run after this one
            model.set_attn_implementation(engine_attention)

    ordered = list(outputs.values())  # generate_batch returns them in input order
    failed = [o.error for o in ordered if o.error is not None]
    generated = [[int(t) for t in o.generated_tokens] for o in ordered]
    lifespans = [o.lifespan for o in ordered if o.lifespan[0] >= 0 and o.lifespan[1] >= 0]
    extra: dict[str, Any] = {
        "eos": "not banned (unsupported), stopping disabled",
        "completed": len(ordered),
        "wrong_length": sum(len(g) != tokens for g in generated),
    }
    if lifespans:
        # Time from the first request leaving the queue to the last finishing: excludes the
        # manager's set-up and tear-down, which the wall time includes.
        active = max(e for _, e in lifespans) - min(s for s, _ in lifespans)
        extra["active_window_s"] = round(active, 4)
        extra["active_tokens_per_s"] = (
            round(sum(map(len, generated)) / active, 3) if active > 0 else None
        )
    problems: list[str] = []
    if len(ordered) != len(requests):
        problems.append(f"{len(requests) - len(ordered)} of {len(requests)} requests missing")
    if failed:
        problems.append(f"{len(failed)} requests failed, first: {failed[0]}")
    if problems:
        problems.extend(errors.messages[:2])  # what generate_batch logged instead of raising
    error = "; ".join(problems) or None
    return PhaseResult(name=name, requests=len(ordered), output_tokens=sum(map(len, generated)),
                       wall_s=wall, concurrency=len(requests), extra=extra, error=error,
                       tokens_by_request=generated)  # fmt: skip


# --- (d) greedy agreement ----------------------------------------------------------------------
def agreement(
    reference: list[list[int]], phase: PhaseResult, eos: frozenset[int] = frozenset()
) -> dict[str, Any]:
    """Requests whose tokens equal the serial ones for the same prompt, and where they diverge.

    ``equal_until_eos`` also counts a request whose tokens match up to the first EOS it emitted:
    a run that cannot ban EOS (generate_batch) differs there by construction, not by numerics.
    """
    equal = until_eos = 0
    first_divergence: list[int] = []
    for i, tokens in enumerate(phase.tokens_by_request):
        ref = reference[i % len(reference)]
        if tokens == ref:
            equal += 1
            until_eos += 1
            continue
        pairs = zip(tokens, ref, strict=False)
        where = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(tokens), len(ref)))
        first_divergence.append(where)
        if where < len(tokens) and tokens[where] in eos:
            until_eos += 1
    return {
        "equal": equal,
        "equal_until_eos": until_eos,
        "total": len(phase.tokens_by_request),
        "first_divergent_position": first_divergence,
    }


# --- report -----------------------------------------------------------------------------------
def markdown_table(
    phases: list[PhaseResult], serial_tps: float, agree: dict[str, dict[str, Any]]
) -> str:
    rows = [
        "| run | requests | concurrency | output tokens | wall s | output tok/s | vs serial "
        "| TTFT p50 ms | TPOT p50 ms | max step | greedy = serial |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        if p.error is not None and p.output_tokens == 0:
            rows.append(f"| {p.name} | {p.requests} | | | | failed | | | | | |")
            continue
        ratio = p.tokens_per_s / serial_tps if serial_tps else math.nan
        a = agree.get(p.name)
        same = f"{a['equal']}/{a['total']}" if a else ""
        rows.append(
            f"| {p.name}{' (error)' if p.error else ''} | {p.requests} | {p.concurrency or ''} | {p.output_tokens} "
            f"| {p.wall_s:.2f} | {p.tokens_per_s:.1f} | {ratio:.2f}x "
            f"| {_fmt(p.ttft_ms.get('p50'))} | {_fmt(p.tpot_ms.get('p50'))} "
            f"| {p.extra.get('max_step_size', '')} | {same} |"
        )  # fmt: skip
        active = p.extra.get("active_tokens_per_s")
        if active:
            # generate_batch builds (and zero-fills) its paged KV cache inside every call, which
            # dominates small runs: show the generation window alone as well.
            rows.append(
                f"| ↳ {p.name}, active window only | | | | {p.extra['active_window_s']:.2f} "
                f"| {active:.1f} | {active / serial_tps:.2f}x | | | | |"
            )  # fmt: skip
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


# --- main -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Fix the thread count before torch is imported: OpenMP reads OMP_NUM_THREADS once, at load,
    # and the default (all cores) on a shared 2-core box makes results swing ~10x.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    levels = sorted(set(args.concurrency))
    # Every level serves the same requests, enough to fill the largest level at least once;
    # a whole number of passes over the prompts keeps each prompt equally represented.
    n_requests = args.prompts * math.ceil(max(max(levels), args.prompts) / args.prompts)

    t0 = time.perf_counter()
    engine, path = load_engine(args.model, args.threads, max_num_seqs=max(32, max(levels)))
    load_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)  # create_backend sets it too; be sure it stuck
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts, prompt_format = encode_prompts(tokenizer, args.prompts)
    requests = [prompts[i % len(prompts)] for i in range(n_requests)]
    eos = sorted(engine.eos_token_ids)
    model = engine.model
    print(
        f"model {args.model} ({path}) on {engine.device}, dtype {model.dtype}, loaded in {load_s:.1f} s; "
        f"torch {torch.__version__} threads {torch.get_num_threads()}, transformers {transformers.__version__}\n"
        f"{args.prompts} prompts ({prompt_format}, {min(map(len, prompts))}-{max(map(len, prompts))} tokens), "
        f"{args.tokens} tokens each, {n_requests} requests per engine level, concurrency {levels}",
        flush=True,
    )  # fmt: skip

    # Order: serial and the engine first, generate_batch last: it may switch the model's attention
    # implementation (switch_to_cb_friendly_attn) and allocates a large paged KV cache.
    serial = run_serial(model, prompts, args.tokens, eos, engine.pad_token_id)
    print(f"  serial: {serial.tokens_per_s:.1f} tok/s", flush=True)
    engine_phases = asyncio.run(run_engine(engine, prompts, args.tokens, levels, n_requests))
    for p in engine_phases:
        print(
            f"  {p.name}: {p.tokens_per_s:.1f} tok/s, max step {p.extra['max_step_size']}",
            flush=True,
        )
    phases = [serial, *engine_phases]
    if not args.skip_generate_batch:
        cb = run_generate_batch(model, requests, args.tokens, engine.pad_token_id)
        print(f"  {cb.name}: {cb.tokens_per_s:.1f} tok/s" + (f" (error: {cb.error})" if cb.error else ""),
              flush=True)  # fmt: skip
        phases.append(cb)

    agree: dict[str, dict[str, Any]] = {}
    for p in engine_phases:
        if p.concurrency in (levels[0], levels[-1]):
            agree[p.name] = agreement(serial.tokens_by_request, p)
    if not args.skip_generate_batch and phases[-1].tokens_by_request:
        agree[phases[-1].name] = agreement(
            serial.tokens_by_request, phases[-1], engine.eos_token_ids
        )

    serial_tps = serial.tokens_per_s
    print()
    print(markdown_table(phases, serial_tps, agree))
    print()
    for p in phases[1:]:
        if p.error is None or p.output_tokens:
            line = f"{p.name}: {p.tokens_per_s / serial_tps:.2f}x serial"
            if active := p.extra.get("active_tokens_per_s"):
                line += (f" (wall, incl. {p.wall_s - p.extra['active_window_s']:.1f} s manager set-up/tear-down;"
                         f" {active / serial_tps:.2f}x in its active window)")  # fmt: skip
            print(line)
        else:
            print(f"{p.name}: failed: {p.error}")
    for name, a in agree.items():
        line = f"greedy agreement, {name} vs serial: {a['equal']}/{a['total']} requests identical"
        if a["equal_until_eos"] != a["equal"]:
            line += f", {a['equal_until_eos']}/{a['total']} identical up to an emitted EOS"
        print(line)

    if args.json_out is not None:
        report = {
            "config": {
                "model": args.model, "model_path": str(path), "tokens": args.tokens, "prompts": args.prompts,
                "requests_per_level": n_requests, "concurrency": levels, "threads": args.threads,
                "smoke": args.smoke, "prompt_format": prompt_format, "prompt_lengths": [len(p) for p in prompts],
                "device": str(engine.device), "dtype": str(model.dtype), "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "load_s": round(load_s, 3),
            },
            "results": [p.to_json(serial_tps) for p in phases],
            "greedy_agreement": agree,
        }  # fmt: skip
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
