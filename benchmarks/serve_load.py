"""Closed-loop load generator for OpenAI-compatible servers (lmserve, vLLM, ...).

``concurrency`` clients each send one streaming request at a time until ``requests`` requests
have been issued (or ``max_duration_s`` has passed: no new request starts after it). Every
request is greedy (``temperature: 0``) with ``ignore_eos: true`` and ``max_tokens`` T, so a
conforming server returns exactly T tokens per request; ``token_count_mismatches`` counts the
requests that did not.

Metrics use the definitions of ``vllm bench serve`` (vllm/benchmarks/serve.py and
lib/endpoint_request_func.py):

* duration: first request sent -> last request finished (the whole run);
* request throughput = completed / duration; output token throughput = sum(output tokens) /
  duration, output tokens from the stream's final ``usage`` chunk
  (``stream_options.include_usage``; the number of token chunks when a server sends none);
* TTFT: request sent -> first SSE event that carries ``choices``;
* e2e latency: request sent -> last event that carries ``choices`` (the trailing usage chunk
  and ``[DONE]`` do not count);
* TPOT per request = (e2e - TTFT) / (output tokens - 1), requests with > 1 token only;
* ITL: the gaps between consecutive ``choices`` events, all requests pooled;
* percentiles are numpy's default (linear interpolation).

On ``/chat/completions`` servers (vLLM and lmserve alike) first send a chunk carrying only
``delta.role``; like ``vllm bench serve`` this counts as the first event, so chat TTFT is
"time to the role chunk" and TPOT/ITL include it. Use ``/completions`` (the default) for TTFT.

Only 127.0.0.1 / localhost / ::1 targets are accepted, and environment proxies are ignored.

    uv run --no-sync python benchmarks/serve_load.py --base-url http://127.0.0.1:8080/openai/v1 \
        --model model --concurrency 16 --requests 64 --max-tokens 32 --json-out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from prompts import PROMPTS as BENCHMARK_PROMPTS  # benchmarks/ is on sys.path when run as a script

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

DEFAULT_PROMPTS: tuple[str, ...] = BENCHMARK_PROMPTS

MAX_ERRORS_KEPT = 5


def check_local_url(base_url: str) -> str:
    """The base URL without a trailing slash; ValueError unless it points at this machine."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"base URL must be http(s)://..., got {base_url!r}")
    if (parts.hostname or "").lower() not in LOCAL_HOSTS:
        raise ValueError(
            f"refusing to load-test {parts.hostname!r}: only 127.0.0.1, localhost and ::1 "
            "targets are allowed"
        )
    return base_url.rstrip("/")


@dataclass
class RequestResult:
    index: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # e2e, seconds
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_reported: bool = False
    text: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile's default (linear interpolation); 0.0 for no values, like vLLM's."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summary_ms(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else 0.0
    return {
        "mean": mean * 1000,
        "p50": percentile(values, 50) * 1000,
        "p99": percentile(values, 99) * 1000,
    }


def _payload(path: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if path.rstrip("/").endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


async def _one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], index: int
) -> RequestResult:
    result = RequestResult(index=index)
    token_chunks = 0
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (pings), event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event and not event.get("choices"):
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return result
                if choices := event.get("choices"):
                    if token_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    token_chunks += 1
                    result.text += _chunk_text(choices[0])
                elif usage := event.get("usage"):
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.usage_reported = True
    except Exception as exc:  # a failed request is a data point, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    if token_chunks == 0:
        result.error = "no chunk with choices received"
        return result
    if not result.usage_reported:
        result.output_tokens = token_chunks
    result.latency = last - start
    result.success = True
    return result


def summarize(
    results: Sequence[RequestResult], duration_s: float, max_tokens: int
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    out_tokens = [r.output_tokens for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "errors": len(failed),
        "error_samples": [f"#{r.index}: {r.error}" for r in failed[:MAX_ERRORS_KEPT]],
        "total_output_tokens": sum(out_tokens),
        "token_count_mismatches": sum(1 for n in out_tokens if n != max_tokens),
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "mean_chunks_per_request": (sum(len(r.itl) + 1 for r in ok) / len(ok)) if ok else 0.0,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": sum(out_tokens) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": _summary_ms([r.ttft for r in ok]),
        "tpot_ms": _summary_ms(tpots),
        "itl_ms": _summary_ms(itls),
        "e2el_ms": _summary_ms([r.latency for r in ok]),
    }


async def run_load(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: list[str],
    path: str = "/completions",
    timeout_s: float = 600,
    max_duration_s: float | None = None,
    api_key: str | None = None,
    sample_texts: int = 0,
    extra_body: dict[str, Any] | None = None,
    models: list[str] | None = None,
) -> dict[str, Any]:
    """Run the load and return the metrics (times in ms, throughputs per second).

    ``models``: request i names ``models[i % len(models)]`` instead of ``model`` (LoRA adapters
    spread over the streams).

    ``timeout_s`` bounds each request; ``max_duration_s`` (optional) is the time cap after
    which no new request starts (requests in flight finish). ``sample_texts`` keeps the
    generated text of the first N requests under ``"samples"``. ``extra_body``: more request
    fields (a ``response_format``, say), the same in every request.
    """
    url = check_local_url(base_url) + "/" + path.lstrip("/")
    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise ValueError("concurrency, requests and max_tokens must be >= 1")
    if not prompts:
        raise ValueError("at least one prompt is needed")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[RequestResult] = []
    next_index = 0
    stopped_by_time_cap = False

    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers, trust_env=False
    ) as client:
        start = time.perf_counter()
        deadline = None if max_duration_s is None else start + max_duration_s

        async def worker() -> None:
            nonlocal next_index, stopped_by_time_cap
            while next_index < requests:
                if deadline is not None and time.perf_counter() >= deadline:
                    stopped_by_time_cap = True
                    return
                index = next_index
                next_index += 1
                name = models[index % len(models)] if models else model
                body = _payload(path, name, prompts[index % len(prompts)], max_tokens)
                body.update(extra_body or {})
                results.append(await _one_request(client, url, body, index))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
        duration = time.perf_counter() - start

    results.sort(key=lambda r: r.index)
    summary = summarize(results, duration, max_tokens)
    summary.update(
        {
            "url": url,
            "model": model,
            "concurrency": concurrency,
            "requests": requests,
            "issued": len(results),
            "max_tokens": max_tokens,
            "stopped_by_time_cap": stopped_by_time_cap,
        }
    )
    if sample_texts:
        summary["samples"] = [r.text for r in results[:sample_texts] if r.success]
    return summary


def format_summary(m: dict[str, Any]) -> str:
    lines = [
        f"target            {m['url']} (model {m['model']!r})",
        f"load              concurrency {m['concurrency']}, {m['issued']}/{m['requests']} "
        f"requests, max_tokens {m['max_tokens']}"
        + (" [stopped by time cap]" if m["stopped_by_time_cap"] else ""),
        f"completed/errors  {m['completed']} / {m['errors']}   "
        f"(token-count mismatches: {m['token_count_mismatches']})",
        f"duration          {m['duration_s']:.2f} s",
        f"request thrpt     {m['request_throughput']:.3f} req/s",
        f"output thrpt      {m['output_throughput']:.2f} tok/s",
    ]
    for key, name in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2el_ms", "E2E"),
    ):
        s = m[key]
        lines.append(
            f"{name:<6} ms         mean {s['mean']:9.1f}   p50 {s['p50']:9.1f}   p99 {s['p99']:9.1f}"
        )
    for sample in m["error_samples"]:
        lines.append(f"error             {sample}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Streaming load against a local OpenAI-compatible server "
        "(vllm bench serve metric definitions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--base-url",
        required=True,
        help="e.g. http://127.0.0.1:8080/openai/v1 (lmserve) or .../v1 (vLLM)",
    )
    p.add_argument("--model", default="model", help="model name sent in each request")
    p.add_argument(
        "--path",
        default="/completions",
        help="/completions or /chat/completions, relative to --base-url",
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="total requests")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="time cap in seconds: no new request starts after it",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt (repeatable); default: 16 built-in prompts",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--json-out", default=None, help="write the metrics here as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_local_url(args.base_url)
    except ValueError as exc:
        print(f"serve_load: {exc}", file=sys.stderr)
        return 2
    metrics = asyncio.run(
        run_load(
            args.base_url,
            args.model,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            prompts=list(args.prompt or DEFAULT_PROMPTS),
            path=args.path,
            timeout_s=args.timeout,
            max_duration_s=args.max_duration,
            api_key=args.api_key,
        )
    )
    print(format_summary(metrics))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, indent=2)
    return 0 if metrics["errors"] == 0 and metrics["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
