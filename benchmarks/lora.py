"""Output tokens/s of 16 streams spread over 4 LoRA adapters vs. 16 streams on the base model,
both backends, SmolLM2 (issue 18: at least 0.7 of the base throughput on each backend).

For each backend one ``lmserve serve --model_id smollm2-135m-instruct`` runs (the flags of
``generation_streams.py``) with ``--enable-lora --max-loras 4`` and four rank-8 adapters on
q/k/v/o (random, non-zero weights: what they compute costs the same as trained ones). Each
round ``serve_load.py`` drives it with the same greedy chat requests (``--max-tokens`` tokens,
EOS ignored) twice, once all on the base model and once request i on adapter i mod 4, alternating
which goes first (``alternating.py``). The ratio is the adapters' output tokens/s over the base's
in the same round; the median over rounds is reported.

    uv run --no-sync python benchmarks/lora.py --json-out lora.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from alternating import alternating_rounds  # noqa: E402
from generation_streams import ENV, FLAGS, MODEL  # noqa: E402
from prompts import PROMPTS  # noqa: E402
from serve_load import run_load  # noqa: E402

from _support.lora_adapters import random_adapter  # noqa: E402
from _support.servers import start_server  # noqa: E402

PATH = "/chat/completions"
ADAPTERS = [f"adapter-{i}" for i in range(4)]


def base_model_dir() -> Path:
    """SmolLM2's folder as lmserve serves it (converted from its GGUF on first use)."""
    from lmserve_backend_hf import convert_builtin
    from lmserve_core.model_files import resolve_model_source

    source = resolve_model_source(model_id=MODEL, model_dir=None, revision=None)
    if source.needs_conversion and source.builtin is not None:
        convert_builtin(source.builtin)
    return Path(source.path)


def _load(base: str, streams: int, requests: int, tokens: int, models: list[str]) -> Any:
    return asyncio.run(run_load(base, models[0], concurrency=streams, requests=requests,
                                max_tokens=tokens, prompts=list(PROMPTS), path=PATH,
                                models=models))  # fmt: skip


def run_backend(
    backend: str, adapters: list[str], streams: int, requests: int, tokens: int, rounds: int
) -> Any:
    extra = ["--enforce-eager"] if backend == "vllm" else []
    lora = ["--enable-lora", "--max-loras", str(len(ADAPTERS)), "--lora-modules", *adapters]
    server = start_server([*FLAGS, "--backend", backend, *extra, *lora], env=ENV, timeout=600)
    out: dict[str, Any] = {"backend": backend}
    try:
        base = server.url + "/openai/v1"
        for warm in (["model"], ADAPTERS):
            _load(base, 4, 4, 4, warm)

        def measure(models: list[str]) -> dict[str, Any]:
            m = _load(base, streams, requests, tokens, models)
            return {"output_throughput": m["output_throughput"], "errors": m["errors"],
                    "tpot_p50_ms": m["tpot_ms"]["p50"]}  # fmt: skip

        def report(r: int, row: dict[str, Any]) -> None:
            print(f"  {backend} round {r}: base {row['base']['output_throughput']:.1f} tok/s, "
                  f"4 adapters {row['adapters']['output_throughput']:.1f} tok/s, ratio "
                  f"{row['ratio']:.3f}", flush=True)  # fmt: skip

        out |= alternating_rounds(
            [("base", lambda: measure(["model"])), ("adapters", lambda: measure(ADAPTERS))],
            rounds,
            ratio=lambda row: (
                row["adapters"]["output_throughput"] / row["base"]["output_throughput"]
            ),
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
    with tempfile.TemporaryDirectory(prefix="lmserve-lora-bench-") as tmp:
        model_dir = base_model_dir()
        modules = [
            f"{name}={random_adapter(model_dir, Path(tmp) / name, seed=i)}"
            for i, name in enumerate(ADAPTERS)
        ]
        results = {
            "model": MODEL, "streams": args.streams, "requests": args.requests,
            "max_tokens": args.max_tokens, "adapters": len(ADAPTERS), "rank": 8,
            "backends": {b: run_backend(b, modules, args.streams, args.requests, args.max_tokens,
                                        args.rounds) for b in args.backends.split(",")},
        }  # fmt: skip
    for backend, r in results["backends"].items():
        print(f"{backend}: 4 adapters / base output tokens/s = {r['median_ratio']:.3f} (median "
              f"of {len(r['rounds'])} rounds)")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    errors = sum(row[k]["errors"] for r in results["backends"].values() for row in r["rounds"]
                 for k in ("base", "adapters"))  # fmt: skip
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
