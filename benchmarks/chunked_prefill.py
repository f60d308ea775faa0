"""A burst of arrivals beside running streams, with and without chunked prefill (issue 20).

``lmserve serve --model_id smollm2-135m-instruct`` (Hugging Face engine, float32, one torch
thread), once per arm, arms in alternating rounds (``alternating.py``):

- whole: ``--max_num_batched_tokens`` large enough that every burst is prefilled in one step
  (what the engine did before chunked prefill);
- chunked: the default budget (or ``--budget``).

In each server: ``--running`` streams generate ``--running-tokens`` greedy tokens each (EOS
ignored, ``/completions``, streamed). Unloaded: the running streams alone; their inter-token
latencies (ITL) pooled. Burst: the running streams again and, once every one has its
``--burst-after``-th token, ``--burst`` requests sent at once (``--burst-tokens`` tokens each,
prompts of ``prompts.PROMPTS`` repeated to ``--prompt-words`` words). Reported: the burst's
time to first token (p50, p99) and the running streams' ITL while the burst is being prefilled
(from the burst's start to its last first token: p50, p99, max), against their unloaded ITL.

Targets: TTFT p99 of the burst at least halved by chunked prefill (whole / chunked >= 2), and
the running streams' ITL p99 during the burst within 2x of unloaded.

    uv run --no-sync python benchmarks/chunked_prefill.py                 # ~4 min here
    uv run --no-sync python benchmarks/chunked_prefill.py --rounds 1 --burst 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from alternating import alternating_rounds  # noqa: E402
from prompts import PROMPTS  # noqa: E402

from _support.servers import start_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
FLAGS = ["--model_id", MODEL, "--model_name", "model", "--backend", "huggingface", "--dtype", "float32",
         "--max_length", "2048", "--max_num_seqs", "32"]  # fmt: skip
WHOLE_BUDGET = 65536  # more than any burst here: one prefill step, as before chunking
DEFAULT_OUT = HERE / "results" / "chunked_prefill.json"


@dataclass
class Stream:
    """One streamed request: when it was sent and when each token chunk arrived."""

    sent: float = 0.0
    tokens: list[float] = field(default_factory=list)
    error: str | None = None


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int,
                 out: Stream, first_tokens: asyncio.Event | None = None,
                 after: int = 0) -> None:  # fmt: skip
    # Special tokens kept in the text: with EOS ignored a stream goes on past <|endoftext|>, whose
    # text is otherwise empty, and a token with no text sends no chunk: the gaps would span
    # several steps.
    body = {"model": "model", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "skip_special_tokens": False, "stream": True}  # fmt: skip
    out.sent = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                out.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                if json.loads(line[5:]).get("choices"):
                    out.tokens.append(time.perf_counter())
                    if first_tokens is not None and len(out.tokens) == after:
                        first_tokens.set()
    except Exception as exc:  # a failed request is a data point
        out.error = f"{type(exc).__name__}: {exc}"[:200]


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    arr = np.asarray(values) * 1000
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max()), "n": len(values)}  # fmt: skip


def _gaps(streams: list[Stream], start: float = 0.0, end: float = float("inf")) -> list[float]:
    """Inter-token gaps of ``streams`` that overlap [start, end]: a stall that ends only after
    the burst's last first token (its step samples the burst's first tokens, then decodes the
    running rows) is in."""
    return [b - a for s in streams for a, b in zip(s.tokens, s.tokens[1:], strict=False)
            if b >= start and a <= end]  # fmt: skip


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    words = " ".join(PROMPTS).split()
    prompts = [" ".join((words * 50)[i * 7 : i * 7 + args.prompt_words])
               for i in range(args.burst)]  # fmt: skip
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await stream(session, url, "warm up", 4, Stream())
        # Unloaded: the running streams alone.
        alone = [Stream() for _ in range(args.running)]
        await asyncio.gather(*(stream(session, url, PROMPTS[i], args.running_tokens, s)
                               for i, s in enumerate(alone)))  # fmt: skip
        # Burst: the running streams, then the burst once each has its burst_after-th token.
        running = [Stream() for _ in range(args.running)]
        ready = [asyncio.Event() for _ in running]
        tasks = [asyncio.ensure_future(stream(session, url, PROMPTS[i], args.running_tokens, s,
                                              ready[i], args.burst_after))
                 for i, s in enumerate(running)]  # fmt: skip
        await asyncio.gather(*(event.wait() for event in ready))
        burst = [Stream() for _ in prompts]
        started = time.perf_counter()
        await asyncio.gather(*(stream(session, url, p, args.burst_tokens, s)
                               for p, s in zip(prompts, burst, strict=True)))  # fmt: skip
        await asyncio.gather(*tasks)
    errors = [s.error for s in [*alone, *running, *burst] if s.error]
    firsts = [s.tokens[0] for s in burst if s.tokens]
    window_end = max(firsts) if firsts else started
    return {
        "errors": errors,
        "burst_ttft_ms": _ms([s.tokens[0] - s.sent for s in burst if s.tokens]),
        "running_itl_unloaded_ms": _ms(_gaps(alone)),
        "running_itl_during_burst_ms": _ms(_gaps(running, started, window_end)),
        "burst_prefill_window_ms": (window_end - started) * 1000,
    }


def run_arm(budget: int, args: argparse.Namespace) -> dict[str, Any]:
    threads = {"OMP_NUM_THREADS": "1"}
    server = start_server([*FLAGS, "--max_num_batched_tokens", str(budget)], env=threads)
    try:
        result = asyncio.run(measure(server.url + "/openai/v1/completions", args))
    finally:
        server.stop()
    result["max_num_batched_tokens"] = budget
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--budget", type=int, default=None,
                   help="chunked arm's --max_num_batched_tokens (default: the server's)")  # fmt: skip
    p.add_argument("--running", type=int, default=4, help="streams already generating")
    p.add_argument("--running-tokens", type=int, default=96)
    p.add_argument("--burst", type=int, default=16, help="requests sent at once")
    p.add_argument("--burst-after", type=int, default=8,
                   help="the burst starts when every running stream has this many tokens")  # fmt: skip
    p.add_argument("--burst-tokens", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    from lmserve_backend_hf.engine import DEFAULT_MAX_NUM_BATCHED_TOKENS

    chunked = args.budget or DEFAULT_MAX_NUM_BATCHED_TOKENS
    print(f"{args.running} running streams, a burst of {args.burst} x {args.prompt_words} words; "
          f"budgets: whole {WHOLE_BUDGET}, chunked {chunked}; load {os.getloadavg()[0]:.2f}",
          flush=True)  # fmt: skip

    def report(r: int, row: dict[str, Any]) -> None:
        for arm in ("whole", "chunked"):
            m = row[arm]
            print(f"  round {r} {arm:7s}: burst TTFT p50 {m['burst_ttft_ms']['p50']:.0f} ms, "
                  f"p99 {m['burst_ttft_ms']['p99']:.0f} ms; running ITL unloaded p99 "
                  f"{m['running_itl_unloaded_ms']['p99']:.0f} ms, during the burst p99 "
                  f"{m['running_itl_during_burst_ms']['p99']:.0f} ms (max "
                  f"{m['running_itl_during_burst_ms']['max']:.0f}); {len(m['errors'])} errors",
                  flush=True)  # fmt: skip
        print(f"  round {r}: TTFT p99 whole / chunked = {row['ratio']:.2f}", flush=True)

    def ratio(row: dict[str, Any]) -> float:
        return float(row["whole"]["burst_ttft_ms"]["p99"] / row["chunked"]["burst_ttft_ms"]["p99"])

    result = alternating_rounds(
        [("whole", lambda: run_arm(WHOLE_BUDGET, args)), ("chunked", lambda: run_arm(chunked, args))],
        args.rounds, ratio, report,
    )  # fmt: skip
    itl_ratios = [row["chunked"]["running_itl_during_burst_ms"]["p99"]
                  / row["chunked"]["running_itl_unloaded_ms"]["p99"] for row in result["rounds"]]  # fmt: skip
    out = {"model": MODEL, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "settings": vars(args) | {"json_out": str(args.json_out), "chunked_budget": chunked,
                                      "whole_budget": WHOLE_BUDGET},
           **result, "chunked_itl_during_burst_over_unloaded_p99": itl_ratios}  # fmt: skip
    print(f"burst TTFT p99, whole / chunked: {result['median_ratio']:.2f} (median; target >= 2); "
          f"chunked running ITL p99 during the burst / unloaded: "
          f"{', '.join(f'{x:.2f}' for x in itl_ratios)} (target <= 2)", flush=True)  # fmt: skip
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
