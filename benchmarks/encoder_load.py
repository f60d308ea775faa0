"""Closed-loop load generator for lmserve's encoder routes (KServe V1 and V2 infer, rerank).

``concurrency`` clients each send one request at a time (one instance per request, texts taken
in turn from a list) until ``requests`` have been issued. A request counts as successful only
with status 200 and one prediction per instance. ``run_rerank_load`` drives vLLM's ``/rerank``
the same way (one query and its documents per request); ``run_json_load`` is the loop both use.
Metrics as in ``serve_load.py``:
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
from collections.abc import Callable, Sequence
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


async def run_json_load(
    url: str,
    body_for: Callable[[int], dict[str, Any]],
    answered: Callable[[int, Any], bool],
    *,
    concurrency: int,
    requests: int,
    warmup: int = 0,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """The closed loop: request ``i`` POSTs ``body_for(i)`` as JSON to ``url`` and succeeds with
    status 200 and ``answered(i, parsed JSON body)``. Returns requests/s, latency percentiles (ms)
    and error counts. ``warmup`` requests (``body_for`` 0, 1, ...) are sent first at the same
    concurrency and not measured; the measured ones start again from 0."""
    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be >= 1")
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:

        async def one(index: int, record: bool) -> None:
            sent = time.perf_counter()
            try:
                async with session.post(url, json=body_for(index)) as response:
                    body = await response.read()
                    ok = response.status == 200 and answered(index, json.loads(body))
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
    """V1 or V2 infer, one text per request (``texts`` in turn); see ``run_json_load``."""
    base = check_local_url(base_url)
    if protocol not in ("v1", "v2"):
        raise ValueError("protocol must be v1 or v2")
    if not texts:
        raise ValueError("texts must be non-empty")
    url = (
        f"{base}/v1/models/{model}:predict"
        if protocol == "v1"
        else f"{base}/v2/models/{model}/infer"
    )
    make_body = v1_body if protocol == "v1" else v2_body
    metrics = await run_json_load(
        url,
        lambda i: make_body([texts[i % len(texts)]]),
        lambda _, body: _answer_count(protocol, body) == 1,
        concurrency=concurrency, requests=requests, warmup=warmup, timeout_s=timeout_s,
    )  # fmt: skip
    return {"url": url, "protocol": protocol, **metrics}


async def run_rerank_load(
    base_url: str,
    model: str,
    queries: Sequence[tuple[str, Sequence[str]]],
    *,
    concurrency: int,
    requests: int,
    top_n: int = 0,
    warmup: int = 0,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """vLLM's ``POST /rerank``, request ``i`` with ``queries[i % len(queries)]`` (a query and
    its documents); it succeeds with ``top_n`` results (0: one per document) and every
    document's index at most once. See ``run_json_load``."""
    url = check_local_url(base_url) + "/rerank"
    if not queries:
        raise ValueError("queries must be non-empty")

    def body_for(i: int) -> dict[str, Any]:
        query, documents = queries[i % len(queries)]
        return {"model": model, "query": query, "documents": list(documents), "top_n": top_n}

    def answered(i: int, body: Any) -> bool:
        documents = queries[i % len(queries)][1]
        indexes = [r["index"] for r in body.get("results", [])]
        want = min(top_n, len(documents)) if top_n else len(documents)
        return len(indexes) == want and len(set(indexes)) == want

    return await run_json_load(url, body_for, answered, concurrency=concurrency,
                               requests=requests, warmup=warmup, timeout_s=timeout_s)  # fmt: skip


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
