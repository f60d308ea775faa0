"""Served generation at 1 / 4 / 16 streams on both backends, SmolLM2 (issue 6, part b).

For each backend (``huggingface``, ``vllm``) one ``lmserve serve --model_id
smollm2-135m-instruct`` is started (float32, one torch thread, the same flags as
``vllm_vs_hf.py``), its cold start to ready is timed, and ``serve_load.py`` drives it with
``--requests`` greedy ``/completions`` requests of ``--max-tokens`` tokens (EOS ignored) at each
stream count: output tokens/s, TTFT, TPOT and ITL as ``vllm bench serve`` defines them. Peak RSS
(VmHWM) of the server process is read after the load (vLLM's engine core is a child process:
its peak is added).

The serial baseline (transformers ``generate()`` one prompt at a time) comes from
``generation_throughput.py``; ``report.py`` runs both and puts the ratios side by side.

    uv run --no-sync python benchmarks/generation_streams.py --json-out gen-streams.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from encoder_throughput import peak_rss_mib  # noqa: E402
from prompts import PROMPTS  # noqa: E402
from serve_load import run_load  # noqa: E402

from _support.servers import start_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
FLAGS = ["--model_id", MODEL, "--model_name", "model", "--torch_threads", "1", "--dtype",
         "float32", "--max_length", "2048", "--max_num_seqs", "32"]  # fmt: skip


def children_peak_rss_mib(pid: int) -> float:
    total = 0.0
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for cpid in child.read_text().split():
            with contextlib.suppress(OSError):  # the child may be gone already
                total += peak_rss_mib(int(cpid))
    return total


def run_backend(backend: str, levels: list[int], requests: int, tokens: int) -> dict[str, Any]:
    extra = ["--enforce-eager"] if backend == "vllm" else []
    started = time.perf_counter()
    server = start_server([*FLAGS, "--backend", backend, *extra], env=ENV, timeout=600)
    out: dict[str, Any] = {"backend": backend, "cold_start_s": time.perf_counter() - started}
    try:
        base = server.url + "/openai/v1"
        asyncio.run(run_load(base, "model", concurrency=2, requests=2, max_tokens=4,
                             prompts=list(PROMPTS)))  # warm-up  # fmt: skip
        out["levels"] = {}
        for level in levels:
            m = asyncio.run(run_load(base, "model", concurrency=level, requests=requests,
                                     max_tokens=tokens, prompts=list(PROMPTS)))  # fmt: skip
            out["levels"][str(level)] = m
            print(f"  {backend} {level:2d} streams: {m['output_throughput']:6.1f} tok/s, "
                  f"TTFT p50 {m['ttft_ms']['p50']:.0f} ms, TPOT p50 {m['tpot_ms']['p50']:.0f} ms, "
                  f"{m['errors']} errors, {m['token_count_mismatches']} wrong lengths", flush=True)  # fmt: skip
        out["peak_rss_mib"] = peak_rss_mib(server.proc.pid)
        out["children_peak_rss_mib"] = children_peak_rss_mib(server.proc.pid)
    finally:
        server.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="huggingface,vllm")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per stream count")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    results = {
        "model": MODEL,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "backends": {
            b: run_backend(b, levels, args.requests, args.max_tokens)
            for b in args.backends.split(",")
        },
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    bad = sum(m["errors"] + m["token_count_mismatches"] for r in results["backends"].values()
              for m in r["levels"].values())  # fmt: skip
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
