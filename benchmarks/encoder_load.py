"""Closed-loop load generator for lmserve's encoder routes (KServe V1 and V2 infer).

``concurrency`` clients each send one request at a time (one instance per request, texts taken
in turn from a list) until ``requests`` have been issued. A request counts as successful only
with status 200 and one prediction per instance. Metrics as in ``serve_load.py``:
duration = first request sent -> last request finished; throughput = successes / duration;
latency percentiles with numpy's default (linear) interpolation, in ms.

The client is aiohttp (as ``vllm bench serve``'s): on this 2-core box httpx's async client
spent 4.6 ms of CPU per request at concurrency 32 (aiohttp: well under 1 ms), so the load
generator, not the server, was what got measured.

Only 127.0.0.1 / localhost / ::1 targets are accepted, and environment proxies are ignored.

    uv run --no-sync python benchmarks/encoder_load.py --base-url http://127.0.0.1:8080 \
        --model all-minilm-l6-v2 --concurrency 32 --requests 640
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from prompts import PROMPTS  # benchmarks/ is on sys.path when run as a script
from serve_load import check_local_url, percentile


def v1_body(texts: Sequence[str]) -> dict[str, Any]:
    return {"instances": list(texts)}


def v2_body(texts: Sequence[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                        "data": list(texts)}]}  # fmt: skip


def _answer_count(protocol: str, body: dict[str, Any]) -> int:
    if protocol == "v1":
        return len(body.get("predictions", []))
    outputs = body.get("outputs") or [{}]
    shape = outputs[0].get("shape") or [0]
    return int(shape[0])


async def run_encoder_load(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    texts: Sequence[str] = PROMPTS,
    protocol: str = "v1",
    warmup: int = 0,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Run the load; return requests/s, latency percentiles (ms) and error counts.

    ``warmup`` requests are sent first (at the same concurrency) and not measured.
    """
    base = check_local_url(base_url)
    if protocol not in ("v1", "v2"):
        raise ValueError("protocol must be v1 or v2")
    if concurrency < 1 or requests < 1 or not texts:
        raise ValueError("concurrency and requests must be >= 1, and texts non-empty")
    url = (
        f"{base}/v1/models/{model}:predict"
        if protocol == "v1"
        else f"{base}/v2/models/{model}/infer"
    )
    make_body = v1_body if protocol == "v1" else v2_body
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:

        async def one(index: int, record: bool) -> None:
            text = texts[index % len(texts)]
            sent = time.perf_counter()
            try:
                async with session.post(url, json=make_body([text])) as response:
                    body = await response.read()
                    ok = response.status == 200 and _answer_count(protocol, json.loads(body)) == 1
                    why = "" if ok else f"{response.status}: {body[:200]!r}"
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if not record:
                return
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors.append(why)

        async def drive(total: int, record: bool) -> float:
            next_index = 0

            async def worker() -> None:
                nonlocal next_index
                while next_index < total:
                    index = next_index
                    next_index += 1
                    await one(index, record)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
            return time.perf_counter() - start

        if warmup:
            await drive(warmup, record=False)
        duration = await drive(requests, record=True)

    ms = [1000 * x for x in latencies]
    return {
        "url": url,
        "protocol": protocol,
        "concurrency": concurrency,
        "requests": requests,
        "completed": len(latencies),
        "failed": len(errors),
        "errors": errors[:5],
        "duration_s": duration,
        "requests_per_s": len(latencies) / duration if duration > 0 else 0.0,
        "latency_ms": {
            "mean": sum(ms) / len(ms) if ms else float("nan"),
            "p50": percentile(ms, 50) if ms else float("nan"),
            "p99": percentile(ms, 99) if ms else float("nan"),
        },
    }


def format_summary(m: dict[str, Any]) -> str:
    lat = m["latency_ms"]
    return (
        f"{m['url']}: concurrency {m['concurrency']}, {m['completed']}/{m['requests']} ok "
        f"({m['failed']} failed) in {m['duration_s']:.1f} s: {m['requests_per_s']:.1f} req/s, "
        f"latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--base-url", default="http://127.0.0.1:8080", help="the server, no path")
    p.add_argument("--model", default="model", help="served model name")
    p.add_argument("--protocol", choices=["v1", "v2"], default="v1")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=640, help="measured requests")
    p.add_argument("--warmup", type=int, default=64, help="unmeasured requests sent first")
    p.add_argument("--json-out", default=None, help="write the metrics here as JSON")
    args = p.parse_args(argv)
    metrics = asyncio.run(
        run_encoder_load(args.base_url, args.model, concurrency=args.concurrency,
                         requests=args.requests, protocol=args.protocol, warmup=args.warmup)
    )  # fmt: skip
    print(format_summary(metrics))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(metrics, fh, indent=2)
    return 0 if metrics["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
