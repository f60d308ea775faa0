"""Soak: 10,000 mixed requests across every task, some abandoned, some invalid (issue 7).

Six servers run side by side, one per task (the test suite's tiny trained models; generation
and text2text on the Hugging Face backend): sequence and token classification, fill mask,
embeddings, text generation, text2text. A closed loop of ``--concurrency`` aiohttp clients
sends ``--requests`` requests drawn with a fixed seed:

- valid (~75%): V1 predict, V2 infer, OpenAI embeddings, completions and chat, streamed or not;
  each must answer 200 (a streamed one must end with ``[DONE]``);
- invalid (~15%): bad JSON, unknown model, wrong types, too-long input with truncation off,
  out-of-range parameters; each must answer the 4xx it deserves;
- abandoned (~10%): the client goes away before the answer (or mid-stream).

Anything else is an unexpected error. Resident memory (RSS) of every server is read after
the first 10% of requests (warm) and at the end: the growth must stay under 10%. At the end
every server must be ready with nothing in flight (admission slots and sequences back to 0).

    uv run --no-sync python benchmarks/soak.py --json-out results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from _support.servers import ServerProcess, start_server  # noqa: E402
from _support.tiny_models import model_path  # noqa: E402

SEED = 7
LONG_TEXT = "the movie was great " * 200  # far past the tiny models' 64 tokens
RSS_LIMIT = 0.10


@dataclass(frozen=True)
class Call:
    task: str
    kind: str  # valid / invalid / abandoned
    route: str
    body: Any  # dict (JSON) or bytes (raw)
    expect: frozenset[int]
    stream: bool = False


def _servers() -> dict[str, list[str]]:
    return {
        "sequence_classification": ["--model_dir", str(model_path("sentiment"))],
        "token_classification": ["--model_dir", str(model_path("ner"))],
        "fill_mask": ["--model_dir", str(model_path("masked_lm"))],
        "text_embedding": ["--model_dir", str(model_path("embedding_mean"))],
        "text_generation": ["--model_dir", str(model_path("llama")), "--backend", "huggingface"],
        "text2text_generation": ["--model_dir", str(model_path("t5"))],
    }


def _valid(task: str, rng: random.Random) -> Call:
    ok = frozenset({200})
    words = rng.choice(["Paris is lovely", "John lives in Rome", "a great film", "bad service"])
    if task in ("sequence_classification", "token_classification", "fill_mask", "text_embedding"):
        text = f"{words} [MASK] ." if task == "fill_mask" else words
        pick = rng.randrange(3)
        if pick == 0:
            return Call(
                task,
                "valid",
                "/v1/models/model:predict",
                {"instances": [text] * rng.randrange(1, 4)},
                ok,
            )
        if pick == 1 or task != "text_embedding":
            tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}
            return Call(task, "valid", "/v2/models/model/infer", {"inputs": [tensor]}, ok)
        return Call(
            task, "valid", "/openai/v1/embeddings", {"model": "model", "input": [text, words]}, ok
        )
    stream = rng.random() < 0.5
    tokens = rng.randrange(1, 24)
    if task == "text_generation" and rng.random() < 0.5:
        body = {"model": "model", "messages": [{"role": "user", "content": words}], "max_tokens": tokens,
                "stream": stream}  # fmt: skip
        return Call(task, "valid", "/openai/v1/chat/completions", body, ok, stream)
    temperature, n = rng.choice([0, 0.8]), rng.choice([1, 1, 2])
    # Several choices need sampling: greedy with n > 1 is a 400, as in vLLM.
    body = {"model": "model", "prompt": words, "max_tokens": tokens, "stream": stream,
            "temperature": temperature, "n": n if temperature else 1}  # fmt: skip
    return Call(task, "valid", "/openai/v1/completions", body, ok, stream)


def _invalid(task: str, rng: random.Random) -> Call:
    bad = frozenset({400})
    generative = task in ("text_generation", "text2text_generation")
    pick = rng.randrange(5)
    if pick == 0:
        route = "/openai/v1/completions" if generative else "/v1/models/model:predict"
        return Call(task, "invalid", route, b'{"instances": [', bad)
    if pick == 1:
        route = "/openai/v1/completions" if generative else "/v1/models/ghost:predict"
        body = {"model": "ghost", "prompt": "x"} if generative else {"instances": ["x"]}
        return Call(task, "invalid", route, body, frozenset({404}))
    if pick == 2:
        if generative:
            return Call(
                task,
                "invalid",
                "/openai/v1/completions",
                {"model": "model", "prompt": "x", "n": 999},
                bad,
            )
        return Call(task, "invalid", "/v1/models/model:predict", {"instances": [1, None]}, bad)
    if pick == 3:
        if generative:
            body = {"model": "model", "prompt": LONG_TEXT * 3, "max_tokens": 4}
            return Call(task, "invalid", "/openai/v1/completions", body, bad)
        body = {"instances": [LONG_TEXT], "parameters": {"truncate": False}}
        return Call(task, "invalid", "/v1/models/model:predict", body, bad)
    if generative:
        body = {"model": "model", "prompt": "x", "temperature": -3}
        return Call(task, "invalid", "/openai/v1/completions", body, bad)
    tensor = {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["only one"]}
    return Call(task, "invalid", "/v2/models/model/infer", {"inputs": [tensor]}, bad)


def plan(requests: int, seed: int) -> list[Call]:
    rng = random.Random(seed)
    tasks = list(_servers())
    calls = []
    for _ in range(requests):
        task = rng.choice(tasks)
        roll = rng.random()
        if roll < 0.75:
            calls.append(_valid(task, rng))
        elif roll < 0.90:
            calls.append(_invalid(task, rng))
        else:
            call = _valid(task, rng)
            calls.append(Call(task, "abandoned", call.route, call.body, frozenset(), call.stream))
    return calls


async def _send(session: aiohttp.ClientSession, url: str, call: Call, rng: random.Random) -> str:
    """The outcome: 'ok', 'abandoned', or a description of what went wrong."""
    kwargs: dict[str, Any] = (
        {"data": call.body, "headers": {"content-type": "application/json"}}
        if isinstance(call.body, bytes) else {"json": call.body}
    )  # fmt: skip
    if call.kind == "abandoned":
        task = asyncio.ensure_future(_read(session, url + call.route, kwargs, call.stream))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task
        return "abandoned"
    status, text = await _read(session, url + call.route, kwargs, call.stream)
    if status not in call.expect:
        return (
            f"{call.task} {call.route}: expected {sorted(call.expect)}, got {status}: {text[:200]}"
        )
    if call.stream and status == 200 and not text.rstrip().endswith("data: [DONE]"):
        return f"{call.task} {call.route}: stream did not end with [DONE]: {text[-200:]}"
    if call.stream and '"error"' in text:
        return f"{call.task} {call.route}: error event in the stream: {text[-300:]}"
    return "ok"


async def _read(
    session: aiohttp.ClientSession, url: str, kwargs: dict[str, Any], stream: bool
) -> tuple[int, str]:
    async with session.post(url, **kwargs) as r:
        return r.status, await r.text()


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (vLLM-style engine processes)."""
    total = 0.0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(c) for c in task.read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def run(
    servers: dict[str, ServerProcess], calls: list[Call], concurrency: int
) -> dict[str, Any]:
    rng = random.Random(SEED + 1)
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    rss_warm: dict[str, float] = {}
    warm_at = len(calls) // 10
    done = 0
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                call = queue.get_nowait()
                try:
                    outcome = await _send(session, servers[call.task].url, call, rng)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = f"{call.task} {call.route}: client error {type(exc).__name__}: {exc}"
                if outcome in ("ok", "abandoned"):
                    outcomes[f"{call.kind}"] += 1
                else:
                    outcomes["unexpected"] += 1
                    unexpected.append(outcome)
                done += 1
                if done == warm_at:
                    rss_warm.update({t: rss_mib(s.proc.pid) for t, s in servers.items()})
                if done % 1000 == 0:
                    print(
                        f"  {done}/{len(calls)} requests, {outcomes['unexpected']} unexpected",
                        flush=True,
                    )

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        await asyncio.sleep(2)  # let aborted sequences drain before the final reads
        final = {}
        for task, server in servers.items():
            async with session.get(server.url + "/metrics") as r:
                text = await r.text()
            async with session.get(server.url + "/v2/health/ready") as r:
                ready = r.status == 200
            rss = rss_mib(server.proc.pid)
            final[task] = {
                "ready": ready,
                "rss_warm_mib": rss_warm[task],
                "rss_end_mib": rss,
                "rss_growth": rss / rss_warm[task] - 1,
                "admitted_requests": _metric(text, "lmserve_admitted_requests"),
                "sequences_unfinished": _metric(text, "lmserve_generation_sequences_unfinished"),
                "requests_in_flight": _metric(text, "lmserve_requests_in_flight"),
            }
    return {"seconds": seconds, "outcomes": dict(outcomes), "unexpected": unexpected[:50],
            "servers": final}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()
    calls = plan(args.requests, SEED)
    servers: dict[str, ServerProcess] = {}
    try:
        for task, flags in _servers().items():
            print(f"starting {task} server", flush=True)
            servers[task] = start_server(flags, env={"OMP_NUM_THREADS": "1"})
        result = asyncio.run(run(servers, calls, args.concurrency))
    finally:
        exit_codes = {task: s.stop() for task, s in servers.items()}
    result |= {"requests": args.requests, "concurrency": args.concurrency, "seed": SEED,
               "exit_codes": exit_codes,
               "mix": dict(Counter(c.kind for c in calls)),
               "tasks": dict(Counter(c.task for c in calls))}  # fmt: skip
    worst = max(s["rss_growth"] for s in result["servers"].values())
    idle = all(s["ready"] and s["admitted_requests"] == 0 and s["sequences_unfinished"] == 0
               for s in result["servers"].values())  # fmt: skip
    result["passed"] = (result["outcomes"].get("unexpected", 0) == 0 and worst < RSS_LIMIT and idle
                        and all(code == 0 for code in exit_codes.values()))  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "unexpected"}, indent=1))
    for line in result["unexpected"][:10]:
        print("UNEXPECTED", line)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
