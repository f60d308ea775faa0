"""Encoder serving against the hardware limit: requests/s vs. the model's batched forward pass.

For one model, in one run:

1. the limit: the model's own forward pass in this process, under the server's thread settings
   (torch, ``--threads`` intra-op threads, one inter-op thread, the OpenMP waits of
   ``lmserve_backend_hf.set_encoder_openmp_waits``),
   on the benchmark sentences tokenized, padded and (when that cuts the padding) split into
   length-sorted passes as lmserve does, at batch 32 (sequences/s) and at batch 1 (ms per
   sentence);
2. cold start: ``lmserve serve`` spawned -> ``/v2/health/ready`` answers 200 (includes the
   interpreter, imports and model load);
3. served: ``encoder_load.py``'s closed loop (V1 predict, one sentence per request) at each
   concurrency in ``--concurrency``; requests/s and its ratio to the limit;
4. overhead per request at concurrency 1, two ways: the served requests' mean latency - the
   mean of the forward passes the server ran for them (its ``lmserve_forward_duration_seconds``,
   read from ``/metrics`` before and after the level: the same requests, so the box's drift
   between minutes cancels out); and served p50 latency - the p50 batch-1 forward time of step 1
   over the same sentences (measured minutes apart, in another process);
5. peak memory: the server process's VmHWM (peak RSS) after the load.

    uv run --no-sync python benchmarks/encoder_throughput.py --model sentiment
    uv run --no-sync python benchmarks/encoder_throughput.py --model all-minilm-l6-v2 --json-out x.json
    uv run --no-sync python benchmarks/encoder_throughput.py --model sentiment --concurrency 32 \
        --api_workers 1,2 --rounds 3 --requests 3000 --json-out benchmarks/results/api-workers.json

``measure`` is the whole run as a function (``benchmarks/gpu_bench.py`` calls it with
``device="cuda"``: the limit's forward pass on the GPU, the server on the GPU it finds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the server and tiny-model helpers of the tests

from encoder_load import format_summary, run_encoder_load  # noqa: E402
from prompts import PROMPTS  # noqa: E402

from _support.servers import start_server  # noqa: E402
from _support.tiny_models import model_path  # noqa: E402
from lmserve_backend_hf import set_encoder_openmp_waits  # noqa: E402

BUILTINS = ("all-minilm-l6-v2",)


def locate(model: str) -> Path:
    if model in BUILTINS:
        from lmserve_core.builtin_models import locate_builtin

        return locate_builtin(model)
    return model_path(model)  # a tiny test model, built on first use


def served_passes(lengths: Sequence[int]) -> list[list[int]]:
    """The passes (row indices) an in-process lmserve server forwards a batch of rows of
    ``lengths`` tokens in: length-sorted chunks when they cut the padding, else one pass
    (``length_sorted_chunks`` with the in-process chunk size and the default token budget)."""
    from lmserve_core.backend import IN_PROCESS_CHUNK_ROWS
    from lmserve_core.encoder.service import length_sorted_chunks
    from lmserve_core.settings import ServeSettings

    budget = ServeSettings.model_fields["max_batch_tokens"].default
    chunks = length_sorted_chunks(lengths, chunk_rows=IN_PROCESS_CHUNK_ROWS,
                                  max_batch_tokens=budget)  # fmt: skip
    return chunks or [list(range(len(lengths)))]


def forward_limit(path: Path, threads: int, batch: int, device: str = "cpu") -> dict[str, float]:
    """The model's forward pass alone, on lmserve's own tokenization and padding, on ``device``
    (inputs copied to it inside the timed part, as the server does)."""
    import torch
    import transformers

    from lmserve_backend_hf.encoder_info import max_length
    from lmserve_backend_hf.rust_tokenizer import load_rust_tokenizer
    from lmserve_core.encoder.service import pad_encodings

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    # The checkpoint's own class (with its task head), as the server loads it.
    config = transformers.AutoConfig.from_pretrained(str(path))
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    model = model_class.from_pretrained(str(path)).eval().to(device)
    tokenizer = load_rust_tokenizer(path, disable_lower_case=False)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    limit = max_length(
        None, json.loads((path / "config.json").read_text()), path, tokenizer.model_max_length
    )  # the server's own truncation length
    encodings = tokenizer.encode_batch(texts, add_special_tokens=True, max_length=limit)

    def padded(rows: list[Any]) -> dict[str, torch.Tensor]:
        arrays = pad_encodings(rows, pad_id=tokenizer.pad_token_id,
                               length=max(len(e) for e in rows), with_token_types=False)  # fmt: skip
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    def run(inputs: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            model(**(inputs if device == "cpu" else {k: v.to(device) for k, v in inputs.items()}))
        if device != "cpu":
            torch.cuda.synchronize()  # kernels run asynchronously: time until they finish

    chunks = served_passes([len(e) for e in encodings])
    passes = [padded([encodings[i] for i in chunk]) for chunk in chunks]

    def run_batch() -> None:
        for inputs in passes:
            run(inputs)

    for _ in range(3):
        run_batch()
    # At least 10 rounds and a second: the tiny BERT's batch takes about 5 ms, and 10 rounds
    # of it (50 ms) swung by a third between runs on this box.
    rounds, started = 0, time.perf_counter()
    while rounds < 10 or time.perf_counter() - started < 1.0:
        run_batch()
        rounds += 1
    batch_rate = batch * rounds / (time.perf_counter() - started)
    singles = [padded([e]) for e in encodings[: len(PROMPTS)]]
    times = []
    for inputs in singles * 3:
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
    return {
        "batch": batch,
        "sequences_per_s": batch_rate,
        "batch1_ms_mean": 1000 * statistics.fmean(times),
        "batch1_ms_p50": 1000 * statistics.median(times),
        "passes": [list(p["input_ids"].shape) for p in passes],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(
    model: str,
    *,
    levels: list[int],
    requests: int,
    warmup: int,
    threads: int,
    backend: str = "huggingface",
    device: str = "cpu",
    server_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Steps 1-5 for ``model``: the limit on ``device``, then the served load at each level.

    ``server_env`` adds to the server's environment (``CUDA_VISIBLE_DEVICES=""`` keeps it on
    the CPU of a GPU machine)."""
    path = locate(model)
    limit = forward_limit(path, threads, batch=max(levels), device=device)
    print(f"{model}: forward limit {limit['sequences_per_s']:.1f} seq/s at batch "
          f"{limit['batch']}, batch-1 forward {limit['batch1_ms_mean']:.2f} ms", flush=True)  # fmt: skip

    env = {"OMP_NUM_THREADS": str(threads), **(server_env or {})}
    started = time.perf_counter()
    server = start_server(["--model_dir", str(path), "--model_name", "m", "--backend",
                           backend, "--torch_threads", str(threads)], env=env)  # fmt: skip
    cold_start = time.perf_counter() - started
    results: dict[str, Any] = {
        "model": model,
        "backend": backend,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "threads": threads,
        # Other load on this shared box (1-minute load average) when the step started.
        "loadavg_at_start": os.getloadavg()[0],
        "forward_limit": limit,
        "cold_start_s": cold_start,
        "server_log": str(server.log_path),
        "levels": {},
    }
    try:
        for level in levels:
            asyncio.run(run_encoder_load(server.url, "m", concurrency=level,
                                         requests=warmup))  # warm-up, not measured  # fmt: skip
            cpu_before = cpu_seconds(server.proc.pid)
            forward_before = forward_counter(server.url)
            m = asyncio.run(run_encoder_load(server.url, "m", concurrency=level,
                                             requests=requests))  # fmt: skip
            # Where the time goes: the server's CPU per request (model threads included).
            used = cpu_seconds(server.proc.pid) - cpu_before
            m["server_cpu_ms_per_request"] = 1000 * used / max(1, m["completed"])
            m.update(forward_passes(forward_before, forward_counter(server.url), m["completed"]))
            m["ratio_to_limit"] = m["requests_per_s"] / limit["sequences_per_s"]
            results["levels"][str(level)] = m
            print(f"  {format_summary(m)}  ({m['ratio_to_limit']:.2f} of the limit, server CPU "
                  f"{m['server_cpu_ms_per_request']:.2f} ms/request)", flush=True)  # fmt: skip
        results["peak_rss_mib"] = peak_rss_mib(server.proc.pid)
    finally:
        server.stop()
    if "1" in results["levels"]:
        c1 = results["levels"]["1"]
        if "server_forward_ms_mean" in c1:
            # One pass per request at concurrency 1: what the server adds around the model.
            mean = c1["latency_ms"]["mean"]
            results["overhead_ms_at_c1_in_server"] = mean - c1["server_forward_ms_mean"]
            print(f"  overhead at concurrency 1, same requests: "
                  f"{results['overhead_ms_at_c1_in_server']:.2f} ms (served mean {mean:.2f} ms "
                  f"- the server's forward passes, mean {c1['server_forward_ms_mean']:.2f} ms)")  # fmt: skip
        # Medians of both, over the same sentences in turn: robust to this box's hiccups.
        p50 = c1["latency_ms"]["p50"]
        results["overhead_ms_at_c1"] = p50 - limit["batch1_ms_p50"]
        print(f"  overhead at concurrency 1 vs step 1: {results['overhead_ms_at_c1']:.2f} ms "
              f"(served p50 {p50:.2f} ms - forward p50 {limit['batch1_ms_p50']:.2f} ms)")  # fmt: skip
    print(f"  cold start {cold_start:.1f} s, peak RSS {results['peak_rss_mib']:.0f} MiB")
    return results


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of the Prometheus histogram ``name`` on the server's ``/metrics``, over all
    its labels; (0, 0) when the server has no such series."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        for part in totals:
            if series == f"{name}_{part}" or series.startswith(f"{name}_{part}{{"):
                totals[part] += float(value)
    return totals["sum"], totals["count"]


def forward_counter(url: str) -> tuple[float, float]:
    """(seconds, passes) the server's model has spent in encoder forward passes so far."""
    return histogram_totals(url, "lmserve_forward_duration_seconds")


def forward_passes(
    before: tuple[float, float], after: tuple[float, float], requests: int
) -> dict[str, float]:
    """The server's forward passes during a level: their mean time and count per request
    (nothing when it timed none: a server without the metric)."""
    if after[1] <= before[1]:
        return {}
    passes = after[1] - before[1]
    return {"server_forward_ms_mean": 1000 * (after[0] - before[0]) / passes,
            "forward_passes_per_request": passes / max(1, requests)}  # fmt: skip


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live children (an --api_workers server's workers)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(FileNotFoundError):  # exited meanwhile
            total += cpu_seconds(int(child))
    return total


def compare_api_workers(
    model: str,
    *,
    workers: list[int],
    rounds: int,
    concurrency: int,
    requests: int,
    warmup: int,
    threads: int,
    backend: str = "huggingface",
) -> dict[str, Any]:
    """Served requests/s of ``--api_workers W`` for each W in ``workers``, alternating them
    round after round (each round starts every server afresh, in turn), at ``concurrency``.

    The ratio is of the per-W medians over the rounds, W against the first W (1): the client
    runs on the same cores, as it would on one box."""
    path = locate(model)
    env = {"OMP_NUM_THREADS": str(threads)}
    runs: dict[str, list[dict[str, Any]]] = {str(w): [] for w in workers}
    for round_no in range(rounds):
        for count in workers:
            server = start_server(["--model_dir", str(path), "--model_name", "m", "--backend",
                                   backend, "--torch_threads", str(threads),
                                   "--api_workers", str(count)], env=env)  # fmt: skip
            try:
                loadavg = os.getloadavg()[0]
                asyncio.run(run_encoder_load(server.url, "m", concurrency=concurrency,
                                             requests=warmup))  # fmt: skip
                cpu_before = process_tree_cpu_seconds(server.proc.pid)
                m = asyncio.run(run_encoder_load(server.url, "m", concurrency=concurrency,
                                                 requests=requests))  # fmt: skip
                used = process_tree_cpu_seconds(server.proc.pid) - cpu_before
            finally:
                server.stop()
            m["server_cpu_ms_per_request"] = 1000 * used / max(1, m["completed"])
            m["loadavg_at_start"] = loadavg
            m["round"] = round_no
            runs[str(count)].append(m)
            print(f"round {round_no} api_workers {count}: {format_summary(m)} (server CPU "
                  f"{m['server_cpu_ms_per_request']:.2f} ms/request, load {loadavg:.1f})",
                  flush=True)  # fmt: skip
    medians = {w: statistics.median(r["requests_per_s"] for r in rs) for w, rs in runs.items()}
    base = medians[str(workers[0])]
    ratios = {w: v / base for w, v in medians.items()}
    for w in medians:
        print(f"api_workers {w}: median {medians[w]:.1f} req/s, {ratios[w]:.2f}x api_workers "
              f"{workers[0]}")  # fmt: skip
    return {
        "model": model,
        "backend": backend,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "threads": threads,
        "concurrency": concurrency,
        "requests": requests,
        "rounds": rounds,
        "median_requests_per_s": medians,
        "ratio_to_first": ratios,
        "runs": runs,
    }


def main() -> int:
    # The OpenMP waits lmserve's Hugging Face backend sets for encoders before torch loads libgomp.
    set_encoder_openmp_waits()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sentiment", help="a tiny test model or all-minilm-l6-v2")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=640, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--backend", default="huggingface", choices=["huggingface", "onnx"])
    p.add_argument("--json-out", default=None)
    p.add_argument("--api_workers", default=None,
                   help="comma list, e.g. 1,2: compare lmserve serve --api_workers W at the "
                        "last --concurrency level instead (no forward limit), --rounds times, "
                        "alternating")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="with --api_workers")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.api_workers:
        compared = compare_api_workers(
            args.model, workers=[int(w) for w in args.api_workers.split(",")],
            rounds=args.rounds, concurrency=levels[-1], requests=args.requests,
            warmup=args.warmup, threads=args.threads, backend=args.backend,
        )  # fmt: skip
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(compared, indent=2) + "\n", encoding="utf-8")
        failed = sum(m["failed"] for rs in compared["runs"].values() for m in rs)
        return 0 if failed == 0 else 1
    results = measure(args.model, levels=levels, requests=args.requests, warmup=args.warmup,
                      threads=args.threads, backend=args.backend)  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    failed = sum(m["failed"] for m in results["levels"].values())
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
