"""Leak checks shared by the reliability tests: abandon streams, then read the gauges."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from _support.servers import ServerProcess

# Sampled, so that n = 2 is allowed (greedy n > 1 is refused, as vLLM does).
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 1.0, "seed": 1}


def metric(server: ServerProcess, name: str) -> float:
    """``name``'s value summed over its label sets (the served ``model``, ...)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    family = re.sub(r"_(total|count|sum|bucket)$", "", name)
    assert f"# HELP {family} " in text or f"# HELP {name} " in text, f"{name} not in /metrics"
    # A labelled series has no sample until its first label set: then it is 0.
    found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return sum(float(v) for v in found)


def wait_for_metric(server: ServerProcess, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} stayed {metric(server, name)}, not {value}"
        time.sleep(0.1)


def assert_idle(server: ServerProcess) -> None:
    """Nothing leaked: no request in flight, no admission slot held, no sequence left."""
    wait_for_metric(server, "lmserve_admitted_requests", 0)
    wait_for_metric(server, "lmserve_generation_sequences_unfinished", 0)
    assert metric(server, "lmserve_requests_in_flight") == 0


async def _abandon(url: str, body: dict[str, object], how: int) -> None:
    """Open a stream and walk away: 0 before any byte, 1 after the headers, 2 mid-stream."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        if how == 0:
            task = asyncio.create_task(c.post("/openai/v1/completions", json=body))
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        async with c.stream("POST", "/openai/v1/completions", json=body) as r:
            assert r.status_code == 200
            if how == 2:
                async for _ in r.aiter_bytes():
                    break


def abandon_many(server: ServerProcess, count: int, concurrency: int) -> None:
    body = {"model": "model", "prompt": "Once upon a time", "stream": True, **LONG}

    async def run() -> None:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await _abandon(server.url, dict(body, n=1 + i % 2), i % 3)

        await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(run())
