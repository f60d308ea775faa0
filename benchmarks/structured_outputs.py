"""Time per output token with a ``json_schema`` constraint vs. unconstrained, 16 streams, both
backends, SmolLM2 (issue 17: at most +10% on vLLM, at most +25% on the Hugging Face backend).

For each backend one ``lmserve serve --model_id smollm2-135m-instruct`` runs (the flags of
``generation_streams.py``); ``serve_load.py`` drives it with the same greedy chat requests
(``--max-tokens`` tokens, EOS ignored) twice per round, once plain and once with a
``response_format`` whose schema's one string field takes every token, alternating which goes
first (``alternating.py``). The constraint is compiled once (the warm-up request) and cached, as any repeated schema
is. The ratio is constrained TPOT p50 / plain TPOT p50 from the same round; the median over
rounds is reported.

    uv run --no-sync python benchmarks/structured_outputs.py --json-out structured.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from alternating import alternating_rounds  # noqa: E402
from generation_streams import ENV, FLAGS, MODEL  # noqa: E402
from prompts import PROMPTS  # noqa: E402
from serve_load import run_load  # noqa: E402

from _support.servers import start_server  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
CONSTRAINED = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
}
PATH = "/chat/completions"


def _load(base: str, streams: int, requests: int, tokens: int, extra: dict[str, Any]) -> Any:
    return asyncio.run(run_load(base, "model", concurrency=streams, requests=requests,
                                max_tokens=tokens, prompts=list(PROMPTS), path=PATH,
                                extra_body=extra))  # fmt: skip


def run_backend(backend: str, streams: int, requests: int, tokens: int, rounds: int) -> Any:
    extra = ["--enforce-eager"] if backend == "vllm" else []
    server = start_server([*FLAGS, "--backend", backend, *extra], env=ENV, timeout=600)
    out: dict[str, Any] = {"backend": backend}
    try:
        base = server.url + "/openai/v1"
        for warm in ({}, CONSTRAINED):  # compiles the schema once, warms both paths
            _load(base, 2, 2, 4, warm)

        def measure(body: dict[str, Any]) -> dict[str, Any]:
            m = _load(base, streams, requests, tokens, body)
            return {"tpot_p50_ms": m["tpot_ms"]["p50"], "errors": m["errors"],
                    "output_throughput": m["output_throughput"]}  # fmt: skip

        def report(r: int, row: dict[str, Any]) -> None:
            print(f"  {backend} round {r}: TPOT p50 plain {row['plain']['tpot_p50_ms']:.1f} "
                  f"ms, json_schema {row['json_schema']['tpot_p50_ms']:.1f} ms, ratio "
                  f"{row['ratio']:.3f}", flush=True)  # fmt: skip

        out |= alternating_rounds(
            [("plain", lambda: measure({})), ("json_schema", lambda: measure(CONSTRAINED))],
            rounds,
            ratio=lambda row: row["json_schema"]["tpot_p50_ms"] / row["plain"]["tpot_p50_ms"],
            report=report,
        )
    finally:
        server.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="huggingface,vllm")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    results = {
        "model": MODEL, "streams": args.streams, "requests": args.requests,
        "max_tokens": args.max_tokens,
        "backends": {b: run_backend(b, args.streams, args.requests, args.max_tokens, args.rounds)
                     for b in args.backends.split(",")},
    }  # fmt: skip
    for backend, r in results["backends"].items():
        print(f"{backend}: json_schema / plain TPOT = {r['median_ratio']:.3f} (median of "
              f"{len(r['rounds'])} rounds)")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    errors = sum(row[k]["errors"] for r in results["backends"].values() for row in r["rounds"]
                 for k in ("plain", "json_schema"))  # fmt: skip
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
